"""Helpers shared by the test modules (fixtures live in conftest.py): running scripts and
snakemake as a user would, measuring a command's own memory, the synthetic models of the
benchmarks, and the inputs of the export and import tests."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from llamaforge.tokenizer import HF_FILES as TOKENIZER_FILES

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures beside the checkout (CI lays a copy of shared/ there; a user's clone may not)
FIXTURES = REPO.parent / "shared" / "fixtures"
WORKFLOW_PARTS = ["Snakefile", "config.yaml", "schemas", "rules", "scripts", "envs", "profiles", "src", "report"]


def copy_workflow(dst: Path) -> Path:
    """A copy of the workflow (no build outputs) in `dst`, as a user's fresh clone would have."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dst / part)
    return dst


def clone_build(src: Path, dst: Path) -> Path:
    """A copy of a built workflow folder with every mtime kept (Snakemake's view is unchanged)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# Runs a command from a freshly started, small Python and prints the command's own peak RSS. A
# child forked straight from pytest would report pytest's resident size as its own ru_maxrss
# (Linux carries the parent's high-water mark across fork and exec), hiding what it used.
_PEAK_RSS = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "_, status, ru = os.wait4(p.pid, 0)\n"
    "code = os.waitstatus_to_exitcode(status)\n"
    "sys.stderr.write(p.stderr.read().decode(errors='replace') if code else '')\n"
    "print(ru.ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)


def peak_rss(cmd) -> int:
    """Peak resident bytes of `cmd` alone (fails with its stderr when it fails)."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, *map(str, cmd)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def baseline_rss(*modules: str) -> int:
    """Peak resident bytes of a Python that only imports `modules` (from this checkout's src/): the
    floor a command's own peak is measured above. A CUDA build of torch adds ~400 MB to every
    process that imports it, so absolute peaks say nothing about streaming; the peak above this does."""
    code = (f"import runpy; runpy.run_path({str(REPO / 'scripts' / '_pathfix.py')!r}); "
            + "; ".join(f"import {m}" for m in modules))
    return peak_rss([sys.executable, "-c", code])


def run_script(name: str, *args, check: bool = False, env_extra: dict | None = None, cwd=None,
               inprocess: bool | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run scripts/<name> as a user would, capturing its output.

    By default the script's Click command runs in this process (`run_in_process`): the same argv,
    cwd, environment, exit status and stdout/stderr, without a fresh interpreter importing torch for
    seconds. A subprocess is used when asked (`inprocess=False`), when the environment must change
    what the interpreter itself does (PYTHON* variables), or when LLAMAFORGE_TEST_SUBPROCESS=1 (the
    whole suite as separate processes)."""
    extra = env_extra or {}
    if inprocess is None:
        inprocess = not kwargs and not any(k.startswith("PYTHON") for k in extra) and \
            os.environ.get("LLAMAFORGE_TEST_SUBPROCESS", "") not in ("1", "true")
    if inprocess:
        proc = run_in_process(name, *args, env_extra=extra, cwd=cwd)
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                              capture_output=True, text=True, env=env, cwd=cwd, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.lru_cache(maxsize=None)
def script_command(name: str):
    """The Click command of scripts/<name>, imported once (its `import _pathfix` finds scripts/)."""
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    spec = importlib.util.spec_from_file_location(f"llamaforge_script_{Path(name).stem}", REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(name: str, *args, env_extra: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """scripts/<name> ARGS as `python scripts/<name> ARGS` would run, but in this process: its exit status
    (SystemExit), stdout and stderr (log records included), and an exception that escapes the command
    printed as the interpreter would (a traceback on stderr, status 1), so a test sees what a user sees."""
    import contextlib
    import io
    import logging
    import traceback

    command = script_command(name)
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env_extra or {})}
    saved_cwd = os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()  # the command's logging.basicConfig then writes to the captured stderr
    code = 0
    try:
        os.environ.update({k: str(v) for k, v in (env_extra or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.main(args=argv, prog_name=name, standalone_mode=True)
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): the interpreter prints it and exits 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # what a user would see: a traceback and status 1
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())




def peft_merge(base: Path, loras: list[Path], tokenizer: Path, out: Path, dtype=None) -> Path:
    """A merged folder made with PEFT alone (stands in for merged/{model} in these tests)."""
    import warnings

    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for lora in loras:
        with safe_open(lora / "adapter_model.safetensors", "pt") as f:
            key = "base_model.model.model.embed_tokens.weight"
            if key in f.keys():  # a vocabulary-extending adapter (Chinese-LLaMA-Plus style)
                model.resize_token_embeddings(f.get_slice(key).get_shape()[0], mean_resizing=False)
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, lora).merge_and_unload()
    model.to(dtype or torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    return out


# ---------------------------------------------------------------------------------------------
# snakemake, as a user runs it


def snakemake_env() -> dict[str, str]:
    """Jobs call `python`: make it this interpreter, whatever PATH the test runner had."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def snakemake(cwd: Path, *args: str, check: bool = True, timeout: float = 900,
              merge_output: bool = False) -> subprocess.CompletedProcess:
    """The snakemake CLI in `cwd` (this interpreter's); with merge_output, stderr goes into stdout.
    With check, a non-zero exit fails the test with the end of the output."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--nocolor", *map(str, args)], cwd=cwd,
                          env=snakemake_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"`snakemake {' '.join(map(str, args))}` failed in {cwd} (exit {proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{(proc.stderr or '')[-6000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# synthetic models (benchmarks/merge.py's synthesizer, loaded by path)


def bench_merge_module():
    spec = importlib.util.spec_from_file_location("llamaforge_bench_merge", REPO / "benchmarks" / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthesize(work: Path, vocab: int, new_vocab: int, rank: int = 8, **shape) -> tuple[Path, Path]:
    """A float16 base and a Chinese-style adapter of `shape` (hidden, intermediate, layers, heads,
    kv_heads) under `work`, made in a child process (a big parent inflates a child's ru_maxrss)."""
    code = (
        "import importlib.util, pathlib, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(REPO / 'benchmarks' / 'merge.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m.SHAPES['t'] = {shape!r}\n"
        f"m.synthesize(pathlib.Path({str(work)!r}), 't', {vocab}, {new_vocab}, {rank})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return work / "base", work / "lora"


# ---------------------------------------------------------------------------------------------
# inputs of the export and import tests (built once per session)


@functools.lru_cache(maxsize=None)
def build_inputs(root: str) -> dict[str, Path]:
    from llamaforge.demo import make_demo
    from llamaforge.merge.run import merge_lora

    root = Path(root)
    demo = root / "demo"
    make_demo(demo, seed=42, echo=lambda *a: None)
    quiet = dict(echo=lambda *a: None, progress=False)
    plus, alpaca = demo / "lora_llama_plus", demo / "lora_alpaca_plus"
    merge_lora(demo / "base", [plus, alpaca], root / "merged-demo", **quiet)  # vocab 1190, [PAD]
    merge_lora(demo / "base", [plus], root / "merged-llama", max_shard_size="100KB", **quiet)  # 1189, sharded
    return {"demo": demo, "merged": root / "merged-demo", "merged_odd": root / "merged-llama",
            "gqa": make_gqa_model(root / "gqa", demo / "sp" / "base.model"),
            "tied": make_gqa_model(root / "tied", demo / "sp" / "base.model", tied=True)}


def make_gqa_model(out: Path, sp_model: Path, tied: bool = False) -> Path:
    """A random LLaMA with grouped-query attention (8 heads, 2 KV heads), an odd vocabulary larger than
    its tokenizer (GGUF pads it), an FFN width that needs ffn_dim_multiplier, and rope_theta 500000;
    tied=True: tie_word_embeddings, so save_pretrained stores no lm_head.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaforge.tokenizer import load_proto, write_hf_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=515, hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # not all ones: a swapped norm would show
    model.to(torch.float16).save_pretrained(out)
    write_hf_tokenizer(load_proto(sp_model), out, model_bytes=sp_model.read_bytes())
    return out


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(folder / "*.safetensors"))):
        out.update(load_file(f))
    return out


def hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def logits(folder_or_config, state: dict | None = None) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    if state is None:
        model = LlamaForCausalLM.from_pretrained(folder_or_config, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(folder_or_config)).float()
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    model.eval()
    ids = torch.arange(1, 40).remainder(model.config.vocab_size).view(1, -1)
    with torch.no_grad():
        return model(ids).logits


