"""Each default lives in one place (llamaforge.defaults, generate.ORIGINAL_GENERATION): the config
schema's defaults, the library's signatures and the scripts' options all say the same."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from helpers import REPO
from llamaforge import defaults as D

SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))


def schema_default(*path: str):
    node = SCHEMA
    for key in path:
        node = node["properties"][key] if key != "*" else node["additionalProperties"]
    return node["default"]


def signature_default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_schema_defaults_are_the_librarys():
    from llamaforge.crawl import crawl
    from llamaforge.evaluate import DEFAULT_TOLERANCE, perplexity
    from llamaforge.generate import ORIGINAL_GENERATION, predict
    from llamaforge.merge.run import merge_lora

    model = ("models", "*")
    pairs = [
        (schema_default(*model, "max_shard_size"), D.MAX_SHARD_SIZE, signature_default(merge_lora, "max_shard_size")),
        (schema_default(*model, "dtype"), D.MERGE_DTYPE, signature_default(merge_lora, "dtype")),
        (schema_default(*model, "device"), D.MERGE_DEVICE, signature_default(merge_lora, "device")),
        (schema_default("demo", "seed"), D.DEMO_SEED),
        (schema_default("eval", "generation", "template"), D.TEMPLATE, signature_default(predict, "template")),
        (schema_default("eval", "generation", "batch_size"), D.BATCH_SIZE, signature_default(predict, "batch_size")),
        (schema_default("eval", "perplexity", "stride"), D.PERPLEXITY_STRIDE, signature_default(perplexity, "stride")),
        (schema_default("eval", "equivalence", "tolerance"), D.EQUIVALENCE_TOLERANCE, DEFAULT_TOLERANCE),
    ]
    for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
        pairs.append((schema_default("eval", "generation", key), ORIGINAL_GENERATION[key]))
    crawl_entry = ("crawl", "*")
    for key, value in (("concurrency", D.CRAWL_CONCURRENCY), ("items_per_request", D.CRAWL_ITEMS_PER_REQUEST),
                       ("seed", D.CRAWL_SEED), ("max_retries", D.CRAWL_MAX_RETRIES), ("timeout", D.CRAWL_TIMEOUT),
                       ("dedup_threshold", D.CRAWL_DEDUP_THRESHOLD), ("price_in", D.CRAWL_PRICE),
                       ("price_out", D.CRAWL_PRICE)):
        pairs.append((schema_default(*crawl_entry, key), value, signature_default(crawl, key)))
    for values in pairs:
        assert len(set(map(repr, map(float if isinstance(values[0], (int, float)) and not isinstance(values[0], bool)
                                     else str, values)))) == 1, values


@pytest.mark.parametrize("script,option,value", [
    ("merge_lora.py", "--max-shard-size", D.MAX_SHARD_SIZE),
    ("merge_lora.py", "--dtype", D.MERGE_DTYPE),
    ("import_pth.py", "--max-shard-size", D.MAX_SHARD_SIZE),
    ("inference.py", "--batch-size", D.BATCH_SIZE),
    ("evaluate.py perplexity", "--stride", D.PERPLEXITY_STRIDE),
    ("crawl_prompts.py", "--concurrency", D.CRAWL_CONCURRENCY),
    ("make_demo.py", "--seed", D.DEMO_SEED),
])
def test_script_options_show_the_same_defaults(script, option, value):
    name, *sub = script.split()
    out = subprocess.run([sys.executable, str(REPO / "scripts" / name), *sub, "--help"], capture_output=True,
                         text=True, check=True).stdout
    block = " ".join(out.split(option, 1)[1].split("\n  -", 1)[0].split())
    assert f"[default: {value}]" in block or f"[default: {value};" in block, block


@pytest.mark.slow  # snakemake -n in a copy of the workflow: seconds each
@pytest.mark.parametrize("entry,key,inside", [
    ({"tokenizers": {"llama": {"base": "tokenizers/llama/tokenizer.model", "extra": "userdata/chinese.model"}}},
     "tokenizers.llama.base", "tokenizers/llama/tokenizer.model lies inside tokenizers/llama"),
    ({"models": {"m": {"base": "merged/m/base", "evaluate": False}}}, "models.m.base",
     "merged/m/base lies inside merged/m"),
    ({"models": {"m": {"base": "exports/m/pth"}}}, "models.m.base", "exports/m/pth is exports/m/pth"),
    ({"models": {"m": {"base": "merged"}}}, "models.m.base", "merged holds merged/m"),
])
def test_a_configured_input_inside_a_folder_the_workflow_builds_stops_the_parse(tmp_path, entry, key, inside):
    """Snakemake deletes a directory output before its job runs: an input inside one would be lost,
    so the config is refused while the workflow is parsed, and the input is still there."""
    from helpers import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "wf")
    victim = wf / inside.split()[0]
    if victim.suffix:
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_bytes(b"the user's own file")
    else:
        victim.mkdir(parents=True, exist_ok=True)
        (victim / "params.json").write_text("{}")
    (wf / "userdata").mkdir()
    (wf / "userdata" / "chinese.model").write_bytes(b"x")
    cfg = {"demo": {"enabled": False}, "tokenizers": {}, "models": {}, "crawl": {}, **entry}
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted((p.relative_to(wf).as_posix(), p.is_dir() or p.read_bytes()) for p in wf.rglob("*")
                    if ".snakemake" not in p.parts)
    proc = snakemake(wf, "-n", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"llamaforge: error: config.yaml: {key}: {inside}, which the workflow builds")
    assert "Fix: move it out of" in errors[0]
    after = sorted((p.relative_to(wf).as_posix(), p.is_dir() or p.read_bytes()) for p in wf.rglob("*")
                   if ".snakemake" not in p.parts)
    assert after == before


def _without_llama_cpp(tmp_path, monkeypatch):
    """PYTHONPATH with a llama_cpp package that cannot be imported (as when the gguf extra is missing)."""
    import os

    blocker = tmp_path / "block" / "llama_cpp"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('llama_cpp is blocked in this test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow  # snakemake -n in a copy of the workflow: seconds each
@pytest.mark.parametrize("models,line", [
    (None, "models.demo.exports: gguf-q4_k_m needs llama-cpp-python. "
           "Fix: pip install 'llamaforge[gguf]' (or remove the export)"),
    ({"demo": {"exports": ["hf", "gguf-q8_0"]}},
     "models.demo.evaluate: the GGUF quality table eval/demo/gguf.json needs llama-cpp-python. "
     "Fix: pip install 'llamaforge[gguf]' (or set evaluate: false, or remove its GGUF exports)"),
    ({"demo": {"exports": ["hf", "gguf-q8_0"], "evaluate": False}}, None),
])
def test_what_needs_llama_cpp_without_it_is_one_line_at_parse_time(tmp_path, monkeypatch, models, line):
    """Which targets exist depends on config.yaml only: a 4-6 bit GGUF export, or the GGUF quality
    table of an evaluated model, without llama-cpp-python stops the parse with one line (not a job
    failing later, nor a target silently left out); a config that needs nothing of it still parses."""
    from helpers import copy_workflow, snakemake

    wf = copy_workflow(tmp_path / "wf")
    if models is not None:
        cfg = yaml.safe_load((wf / "config.yaml").read_text())
        cfg["models"] = {name: {**cfg["models"]["demo"], **m} for name, m in models.items()}
        cfg["tokenizers"] = {"demo-alpaca": cfg["tokenizers"]["demo-alpaca"]}
        (wf / "config.yaml").write_text(yaml.safe_dump(cfg))
    _without_llama_cpp(tmp_path, monkeypatch)
    proc = snakemake(wf, "-n", check=False)
    if line is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "eval/demo/gguf.json" not in proc.stdout
        return
    errors = [x for x in proc.stderr.splitlines() if x.startswith("llamaforge: error:")]
    assert proc.returncode != 0 and errors == [f"llamaforge: error: config.yaml: {line}"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
