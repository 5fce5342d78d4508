"""Each metadata file of an input folder is opened at most once per process (issue 21): counted by
strace (openat for reading, every thread, native libraries included) around one command, or where
strace is missing by Python's audit hook (Python's own opens only)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from families import family_tokenizer, make_family_model

ROOT = Path(__file__).resolve().parents[1]
METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
_OPEN = re.compile(r'openat\(AT_FDCWD, "([^"]+)", ([A-Z_|]+)')
_AUDIT = """
import os, runpy, sys
log = open(os.environ["OPENS_LOG"], "w")
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        reading = (mode is None and not flags & (os.O_WRONLY | os.O_RDWR)) or (mode is not None and "r" in mode
                   and "+" not in mode)
        if reading:
            log.write(os.fsdecode(os.path.abspath(args[0])) + "\\n"); log.flush()
sys.addaudithook(hook)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def opens(tmp_path: Path, script: str, *args) -> Counter:
    """How often the command opened each metadata file for reading: {path: count}."""
    log = tmp_path / "opens.log"
    cmd = [sys.executable, str(ROOT / "scripts" / script), *map(str, args)]
    env = {**os.environ, "OPENS_LOG": str(log)}
    if shutil.which("strace"):
        cmd = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log), *cmd]
    else:
        cmd = [sys.executable, "-c", _AUDIT, *cmd[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counts: Counter = Counter()
    for line in log.read_text(errors="replace").splitlines():
        m = _OPEN.search(line)
        path, flags = (m.group(1), m.group(2)) if m else (line.strip(), "O_RDONLY")
        if "O_WRONLY" in flags or "O_RDWR" in flags or "ENOENT" in line or "O_DIRECTORY" in flags:
            continue
        if os.path.basename(path) in METADATA:
            counts[os.path.realpath(path)] += 1
    return counts


def assert_once(counts: Counter, *folders: Path, expect: tuple[str, ...] = ()) -> None:
    """Every metadata file of `folders` opened at most once, and those in `expect` exactly once (the
    count sees the opens at all)."""
    inside = {p: n for p, n in counts.items() if any(p.startswith(os.path.realpath(f) + os.sep) for f in folders)}
    assert {p: n for p, n in inside.items() if n > 1} == {}
    for name in expect:
        assert any(os.path.basename(p) == name for p in inside), f"{name} never opened: {sorted(inside)}"


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    """A Llama-3.1-style model: tokenizer.json only (byte-level BPE), llama3 rope scaling."""
    root = tmp_path_factory.mktemp("bpe")
    tok, rows = family_tokenizer("llama3", root / "tokenizer")
    return make_family_model(root / "model", "llama3", tok, rows)


def test_merge_opens_each_metadata_file_once(demo, tmp_path):
    from llamaforge.tokenizer import merge_tokenizers

    tok = tmp_path / "tok"
    merge_tokenizers(demo / "sp" / "base.model", demo / "sp" / "chinese.model", tok, add_tokens=["[PAD]"],
                     echo=lambda *a: None)
    counts = opens(tmp_path, "merge_lora.py", "--base", demo / "base", "--lora", demo / "lora_llama_plus",
                   "--lora", demo / "lora_alpaca_plus", "--tokenizer", tok, "--output", tmp_path / "merged",
                   "--no-progress")
    assert_once(counts, demo / "base", tok, expect=("config.json", "generation_config.json", "tokenizer.json",
                                                     "tokenizer_config.json", "special_tokens_map.json"))
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_export_of_a_sentencepiece_model_opens_each_once(inputs, tmp_path, outtype):
    model = inputs["merged"]
    counts = opens(tmp_path, "export_gguf.py", "--model", model, "--outtype", outtype, "--output", tmp_path / "m.gguf")
    assert_once(counts, model, expect=("config.json", "tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json"))


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_export_of_a_tokenizer_json_model_opens_each_once(bpe_model, tmp_path, outtype):
    counts = opens(tmp_path, "export_gguf.py", "--model", bpe_model, "--outtype", outtype,
                   "--output", tmp_path / "m.gguf")
    assert_once(counts, bpe_model, expect=("config.json", "tokenizer.json", "tokenizer_config.json"))


def test_meta_export_opens_each_once(inputs, tmp_path):
    model = inputs["merged"]
    counts = opens(tmp_path, "export_pth.py", "--model", model, "--output", tmp_path / "pth")
    assert_once(counts, model, expect=("config.json", "tokenizer.json"))


def test_the_count_sees_a_second_open(inputs, tmp_path):
    """The counter itself: a command that reads config.json twice is caught."""
    script = tmp_path / "twice.py"
    script.write_text("import sys, pathlib\nfor _ in range(2):\n    pathlib.Path(sys.argv[1]).read_bytes()\n")
    counts = opens(tmp_path, os.fspath(script), inputs["merged"] / "config.json")
    assert counts[os.path.realpath(inputs["merged"] / "config.json")] == 2
