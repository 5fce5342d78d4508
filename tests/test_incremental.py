"""Incremental rebuilds (issue 7), asserted on the jobs Snakemake plans in a copy of the workflow.

After one full build of the default target:
  (a) a second run has nothing to do;
  (b) new weights in one adapter rerun exactly the jobs downstream of that file: the merge, exports
      and evaluations of the models that use the adapter, and no tokenizer or demo job;
  (c) a changed merge parameter in config.yaml (max_shard_size) reruns that model's merge and what
      follows it, nothing of the other models;
  (d) an edited rule script reruns every job of the rules that run it, and what follows them;
  (e) a merge killed with SIGKILL in the middle of writing leaves no output that looks done, and
      the rerun completes with the bytes of an uninterrupted build.

"Exactly downstream" is computed from the declared graph (`snakemake -n -F`: every job with its
inputs and outputs) and compared with what Snakemake plans after the change, so the tests follow
the workflow as rules are added (exports, evaluation) without a hard-coded job list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import clone_build, copy_workflow, snakemake, snakemake_env

from llamaforge.demo import synthetic_sp_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_build")]  # one worker, one build

# Snakemake's own marker inside directory outputs (empty, its mtime is the folder's date).
SNAKEMAKE_MARKERS = {".snakemake_timestamp"}


# ---- running snakemake and reading its plan --------------------------------------------------------


def run_snakemake(cwd: Path, *args: str, check: bool = True, timeout: float = 600) -> str:
    """helpers.snakemake with stdout and stderr together, as the dry-run parser reads them."""
    return snakemake(cwd, *args, check=check, timeout=timeout, merge_output=True).stdout


@dataclass(frozen=True)
class Job:
    rule: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    wildcards: tuple[tuple[str, str], ...]
    reason: str

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.rule, self.outputs)

    @property
    def wc(self) -> dict[str, str]:
        return dict(self.wildcards)

    def __str__(self) -> str:
        what = ",".join(f"{k}={v}" for k, v in self.wildcards)
        if not what and self.outputs:
            what = self.outputs[0] + (f" +{len(self.outputs) - 1} more" if len(self.outputs) > 1 else "")
        return f"{self.rule}[{what}]"


_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) ([A-Za-z_]\w*):\s*$")
_FIELD = re.compile(r"^ {4}(\w[\w ]*?): ?(.*)$")
_TOTAL = re.compile(r"^total\s+(\d+)\s*$")


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(sorted(v.strip() for v in value.split(", ") if v.strip()))


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of `snakemake -n` output: one block per job, `rule NAME:` then indented fields."""
    jobs: list[Job] = []
    current: dict | None = None

    def flush():
        if current is not None:
            wildcards = tuple(sorted(
                tuple(kv.split("=", 1)) for kv in current.get("wildcards", "").split(", ") if "=" in kv))
            jobs.append(Job(rule=current["rule"], outputs=_split_list(current.get("output", "")),
                            inputs=_split_list(current.get("input", "")), wildcards=wildcards,
                            reason=current.get("reason", "")))

    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            flush()
            current = {"rule": m.group(1)}
            continue
        f = _FIELD.match(line)
        if current is not None and f:
            current.setdefault(f.group(1), f.group(2))
        elif current is not None and line.strip() and not line.startswith(" "):
            flush()
            current = None
    flush()
    totals = [int(m.group(1)) for m in map(_TOTAL.match, text.splitlines()) if m]
    if totals:
        assert totals[-1] == len(jobs), (
            f"parsed {len(jobs)} jobs but Snakemake's job stats say {totals[-1]}; the dry-run format changed?\n"
            f"{text[-4000:]}")
    elif "Nothing to be done" not in text:
        raise AssertionError(f"neither a job table nor 'Nothing to be done' in the dry run:\n{text[-4000:]}")
    return jobs


def planned(cwd: Path, *targets: str) -> list[Job]:
    """Jobs a `snakemake` run would execute now, without the output-less target rule (`all`)."""
    return [j for j in parse_dry_run(run_snakemake(cwd, "-n", "--cores", "2", *targets)) if j.outputs]


def full_graph(cwd: Path, *targets: str) -> list[Job]:
    """Every job of the targets' DAG, as if nothing were built (`-n -F`)."""
    return [j for j in parse_dry_run(run_snakemake(cwd, "-n", "-F", "--cores", "2", *targets)) if j.outputs]


def downstream(graph: list[Job], changed_files=(), seeds=()) -> set:
    """Keys of the jobs that read one of `changed_files` or follow from a `seeds` job, transitively."""
    changed = set(changed_files)
    result = {j.key for j in graph if changed & set(j.inputs)} | {j.key for j in seeds}
    grew = True
    while grew:
        grew = False
        produced = [o for j in graph if j.key in result for o in j.outputs]
        for j in graph:
            if j.key in result:
                continue
            if any(i == o or i.startswith(o.rstrip("/") + "/") for i in j.inputs for o in produced):
                result.add(j.key)
                grew = True
    return result


def describe(jobs) -> str:
    return "\n".join(f"  {j}   (reason: {j.reason[:160]})" for j in sorted(jobs, key=str)) or "  (none)"


def assert_plan(jobs: list[Job], graph: list[Job], expected: set, what: str) -> None:
    by_key = {j.key: j for j in graph}
    got = {j.key for j in jobs}
    extra = [j for j in jobs if j.key not in expected]
    missing = [by_key[k] for k in expected - got]
    assert not extra and not missing, (
        f"{what}: the planned jobs differ from the jobs downstream of the change.\n"
        f"planned but not downstream:\n{describe(extra)}\n"
        f"downstream but not planned:\n{describe(missing)}\n"
        f"all planned jobs:\n{describe(jobs)}")


# ---- fixtures ---------------------------------------------------------------------------------------


clone = clone_build


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path, without Snakemake's markers."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in SNAKEMAKE_MARKERS}


# `built`: this module's copy of the session's demo build (conftest.py)


@pytest.fixture(scope="module")
def graph(built) -> list[Job]:
    jobs = full_graph(built)
    assert jobs, "the default target has no jobs?"
    return jobs


def models_config(wf: Path) -> dict:
    return yaml.safe_load((wf / "config.yaml").read_text(encoding="utf-8")).get("models") or {}


# ---- (a) --------------------------------------------------------------------------------------------


def test_a_second_run_has_nothing_to_do(built, tmp_path):
    assert planned(built) == [], "a second run right after the full build plans jobs:\n" + describe(planned(built))
    # the other tests work on copies of the build: a copy must look just as finished
    copy = clone(built, tmp_path / "copy")
    jobs = planned(copy)
    assert jobs == [], "a copy of the finished build (mtimes kept) plans jobs:\n" + describe(jobs)


# ---- (b) --------------------------------------------------------------------------------------------


def _rewrite_one_tensor(path: Path) -> str:
    """New values for one LoRA tensor of a safetensors file, keeping it a valid adapter."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if "lora_B" in k or "lora_A" in k)[0]
    tensors[name] = tensors[name] + 0.125  # exact in float16/bfloat16/float32: the bytes change
    save_file(tensors, str(path), metadata=metadata)
    return name


def test_b_new_adapter_weights_rerun_only_the_models_that_use_it(built, graph, tmp_path):
    models = models_config(built)
    users: dict[str, list[str]] = {}
    for name, m in models.items():
        for lora in m.get("loras") or []:
            users.setdefault(lora, []).append(name)
    # an adapter used by some models but not all, so "only those models" means something
    candidates = sorted(lora for lora, ms in users.items() if 0 < len(ms) < len(models)
                        and any(i.startswith(f"{lora}/") for j in graph for i in j.inputs))
    assert candidates, f"config.yaml has no adapter used by only some models: {users}"
    lora = candidates[0]
    using = set(users[lora])
    weights = f"{lora}/adapter_model.safetensors"

    wf = clone(built, tmp_path / "wf")
    tensor = _rewrite_one_tensor(wf / weights)
    jobs = planned(wf)

    expected = downstream(graph, changed_files=[weights])
    what = f"after new values for {tensor} in {weights} (used by {sorted(using)})"
    for model in using:  # the merge of every model that uses the adapter
        assert any(f"merged/{model}" in j.outputs for j in jobs), (
            f"{what}: merged/{model} is not rebuilt:\n{describe(jobs)}")
    others = [j for j in jobs if "model" in j.wc and j.wc["model"] not in using]
    assert not others, f"{what}: jobs of models that do not use {lora} are planned:\n{describe(others)}"
    upstream = [j for j in jobs if any(o.startswith(("tokenizers/", "resources/")) for o in j.outputs)]
    assert not upstream, f"{what}: tokenizer or demo jobs are planned:\n{describe(upstream)}"
    merge = next(j for j in jobs if f"merged/{sorted(using)[0]}" in j.outputs)
    assert weights in merge.reason, f"{what}: the merge's reason does not name the weights: {merge.reason}"
    assert_plan(jobs, graph, expected, what)


# ---- (c) --------------------------------------------------------------------------------------------


def test_c_changed_merge_parameter_reruns_that_merge(built, graph, tmp_path):
    wf = clone(built, tmp_path / "wf")
    cfg = yaml.safe_load((wf / "config.yaml").read_text(encoding="utf-8"))
    merges = {m: j for j in graph for m in cfg["models"] if f"merged/{m}" in j.outputs}
    model = next(m for m in cfg["models"] if m in merges and cfg["models"][m].get("loras"))
    old = cfg["models"][model].get("max_shard_size", "5GB")
    new = "200KB" if old != "200KB" else "250KB"
    cfg["models"][model]["max_shard_size"] = new
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    jobs = planned(wf)

    what = f"after max_shard_size {old} -> {new} for model {model}"
    merge = next((j for j in jobs if j.key == merges[model].key), None)
    assert merge is not None, f"{what}: merged/{model} is not rebuilt:\n{describe(jobs)}"
    assert "param" in merge.reason.lower(), f"{what}: the merge reruns, but not for its params: {merge.reason}"
    others = [j for j in jobs if "model" in j.wc and j.wc["model"] != model]
    assert not others, f"{what}: jobs of other models are planned:\n{describe(others)}"
    # rules that read config.yaml itself (none today) would rightly rerun too
    expected = downstream(graph, changed_files=["config.yaml"], seeds=[merges[model]])
    assert_plan(jobs, graph, expected, what)


# ---- (d) --------------------------------------------------------------------------------------------


def planned_after_edit(wf: Path, rel: str) -> list[Job]:
    """The jobs Snakemake plans while `rel` carries an appended comment; the file is then restored
    byte for byte, with its mtime."""
    path = wf / rel
    original, st = path.read_bytes(), path.stat()
    path.write_bytes(original + b"\n# edited by tests/test_incremental.py\n")
    try:
        return planned(wf)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_d_edited_script_reruns_its_rule(built, graph, tmp_path):
    wf = clone(built, tmp_path / "wf")
    scripts = sorted({i for j in graph for i in j.inputs if i.startswith("scripts/") and i.endswith(".py")})
    assert "scripts/merge_tokenizers.py" in scripts, f"merge_tokenizers.py is not a declared input: {scripts}"
    for script in scripts:
        jobs = planned_after_edit(wf, script)
        what = f"after an edit of {script}"
        users = [j for j in graph if script in j.inputs]
        not_rerun = [j for j in users if j.key not in {p.key for p in jobs}]
        assert not not_rerun, f"{what}: jobs that run it are not planned:\n{describe(not_rerun)}"
        assert_plan(jobs, graph, downstream(graph, changed_files=[script]), what)
    # the same bytes and mtime again: nothing to do
    assert planned(wf) == [], "restoring the scripts did not restore the finished state"


def test_d2_edited_library_module_reruns_exactly_the_jobs_that_import_it(built, graph, tmp_path):
    """Each module of src/llamaforge/ is a declared input of exactly the jobs whose script can import
    it (llamaforge.deps, deferred imports included); an edit reruns those and what follows them."""
    from llamaforge.deps import script_closure

    wf = clone(built, tmp_path / "wf")
    pkg = wf / "src" / "llamaforge"
    # the top-level modules, and of each sub-package its __init__ and one module in it (a dry run each)
    modules = sorted([p.relative_to(wf).as_posix() for p in pkg.glob("*.py")]
                     + [p.relative_to(wf).as_posix() for sub in sorted(pkg.glob("*/__init__.py"))
                        for p in [sub, sorted(x for x in sub.parent.glob("*.py") if x.name != "__init__.py")[-1]]])
    scripts = sorted({i for j in graph for i in j.inputs if i.startswith("scripts/") and i.endswith(".py")
                      and not i.endswith("_pathfix.py")})
    closures = {s: set(script_closure(s, wf)) for s in scripts}
    for j in graph:  # each job declares exactly its script's closure as code
        code = {i for i in j.inputs if i.startswith(("scripts/", "src/llamaforge/")) and i.endswith(".py")}
        script = next(i for i in code if i in closures)
        assert code == closures[script], f"{j}: declared code {sorted(code)} != closure {sorted(closures[script])}"
    for module in modules:
        users = [j for j in graph if module in j.inputs]
        if not users:
            continue
        jobs = planned_after_edit(wf, module)
        assert_plan(jobs, graph, downstream(graph, changed_files=[module]), f"after an edit of {module}")
    assert planned(wf) == [], "restoring the modules did not restore the finished state"


@pytest.mark.parametrize("script,args", [
    ("merge_lora.py", ["--base", "resources/demo/base", "--lora", "resources/demo/lora_llama_plus", "--output",
                       "{tmp}/m", "--no-progress"]),
    ("export_gguf.py", ["--model", "merged/demo", "--output", "{tmp}/m.gguf", "--outtype", "q8_0"]),
    ("export_pth.py", ["--model", "merged/demo", "--output", "{tmp}/pth"]),
    ("merge_tokenizers.py", ["--base", "resources/demo/sp/base.model", "--extra", "resources/demo/sp/chinese.model",
                             "--output", "{tmp}/tok"]),
    ("evaluate.py", ["perplexity", "--model", "merged/demo", "--output", "{tmp}/p.json", "--max-length", "64"]),
    ("inference.py", ["--model", "merged/demo", "--predictions-file", "{tmp}/p.json", "--max-new-tokens", "2"]),
])
def test_the_closure_holds_every_module_a_script_really_runs(built, tmp_path, script, args):
    """What a real run of a script imports from the package is within its declared closure."""
    from llamaforge.deps import script_closure

    record = tmp_path / "modules.json"
    hook = tmp_path / "hook"  # a sitecustomize that records the package's modules at exit
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(record)!r}, 'w').write(json.dumps(sorted("
        "getattr(m, '__file__', None) or '' for n, m in list(sys.modules.items()) if n.split('.')[0] == 'llamaforge'))))\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {**snakemake_env(), "PYTHONPATH": str(hook)}
    proc = subprocess.run([sys.executable, str(built / "scripts" / script), *argv], cwd=built, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {Path(f).resolve().relative_to(built.resolve()).as_posix() for f in json.loads(record.read_text()) if f}
    declared = set(script_closure(f"scripts/{script}", built))
    assert ran and ran <= declared, f"{script} ran {sorted(ran - declared)} outside its closure"


# ---- (e) --------------------------------------------------------------------------------------------

BIG = dict(hidden=1024, intermediate=2816, layers=8, heads=8, vocab=4096, r=8)  # ~240 MB of float16


def synthesize_big(root: Path, s=BIG) -> tuple[Path, Path]:
    """A float16 LLaMA base (streamed to disk) and a PEFT LoRA (r=8 on q/v) for it."""
    import torch
    from safetensors.torch import save_file

    from llamaforge.formats.safetensors import ShardedSafetensorsWriter, plan_shards
    from llamaforge.formats.dtypes import TensorInfo

    base, lora = root / "base", root / "lora"
    base.mkdir(parents=True)
    lora.mkdir(parents=True)
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                   (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    g = torch.Generator().manual_seed(0)
    infos = [TensorInfo(n, torch.float16, sh) for n, sh in shapes]
    writer = ShardedSafetensorsWriter(base, plan_shards(infos, sum(t.nbytes for t in infos) // 2 + 1))
    for n, sh in shapes:
        writer.write(n, (torch.ones(sh) if n.endswith("norm.weight") else torch.randn(sh, generator=g) * 0.02).half())
    writer.close()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
        "vocab_size": v, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
        "rope_theta": 10000.0}, indent=2))
    (base / "tokenizer.model").write_bytes(synthetic_sp_model(v))
    sd = {}
    for n in range(s["layers"]):
        for proj in ("q_proj", "v_proj"):
            k = f"base_model.model.model.layers.{n}.self_attn.{proj}"
            sd[f"{k}.lora_A.weight"] = (torch.randn(s["r"], h, generator=g) * 0.01).half()
            sd[f"{k}.lora_B.weight"] = (torch.randn(h, s["r"], generator=g) * 0.01).half()
    save_file(sd, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s["r"], "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False, "bias": "none",
        "inference_mode": True, "base_model_name_or_path": "base"}, indent=2))
    return base, lora


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (jobs may run in their own process groups)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the merge's processes")
def test_e_merge_killed_mid_write_is_never_taken_as_done(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    synthesize_big(wf / "inputs" / "big")
    cfg = yaml.safe_load((wf / "config.yaml").read_text(encoding="utf-8"))
    # several shards, so a kill can fall between two files of the output
    cfg["models"]["big"] = {"base": "inputs/big/base", "loras": ["inputs/big/lora"], "max_shard_size": "60MB"}
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    target, out = "merged/big", wf / "merged" / "big"

    # an uninterrupted build: the reference bytes
    t0 = time.monotonic()
    run_snakemake(wf, "--cores", "1", target)
    clean_seconds = time.monotonic() - t0
    reference = tree_digest(out)
    full_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 1, "the big model was meant to be sharded"
    shutil.rmtree(out)

    # the same build, killed with SIGKILL while it writes the shards
    log = open(tmp_path / "killed-run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--nocolor", "--cores", "1", target], cwd=wf,
                            env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    partial: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert not out.exists(), "merged/big appeared while the merge was still writing"
            tmps = list((wf / "merged").glob(".big.tmp-*")) if (wf / "merged").is_dir() else []
            sizes = {p.name: p.stat().st_size for t in tmps for p in t.glob("*.safetensors") if p.is_file()}
            if sum(sizes.values()) > 8 << 20:  # several MB of tensor bytes written: mid-write
                partial = sizes
                break
            if proc.poll() is not None:
                pytest.fail(f"the merge finished ({proc.returncode}) before it could be killed "
                            f"(the clean build took {clean_seconds:.1f} s): make BIG larger.\n"
                            + (tmp_path / "killed-run.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("the merge wrote nothing into merged/.big.tmp-* within 300 s:\n"
                            + (tmp_path / "killed-run.log").read_text()[-3000:])
            time.sleep(0.005)
    finally:
        victims = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:  # a job in its own process group or session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        log.close()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not [p for p in victims if _alive(p)], "processes of the killed run are still alive"
    assert 0 < sum(partial.values()) < full_size, f"not killed mid-write: {partial} of {full_size} bytes"

    # nothing that looks done: no merged/big, and Snakemake plans the merge again
    assert not out.exists(), f"merged/big exists after the kill: {sorted(os.listdir(out))}"
    jobs = planned(wf, target)
    assert [j.rule for j in jobs if target in j.outputs], f"the merge is not planned after the kill:\n{describe(jobs)}"

    # The rerun completes, with the bytes of the uninterrupted build. A SIGKILLed snakemake cannot
    # remove its lock, so the first rerun refuses and names the fix, which a user then runs
    # (README: "After a crash").
    rerun = run_snakemake(wf, "--cores", "1", target, check=False)
    if "LockException" in rerun:
        assert "--unlock" in rerun, rerun[-3000:]
        run_snakemake(wf, "--unlock")
        rerun = run_snakemake(wf, "--cores", "1", target)
    assert "Finished jobid" in rerun or "steps (100%) done" in rerun, rerun[-3000:]
    assert tree_digest(out) == reference, f"the rerun's output differs from a clean build:\n{rerun[-3000:]}"
    assert planned(wf, target) == [], "the rerun's output is not taken as done"
