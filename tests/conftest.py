"""Shared fixtures: the demo inputs (generated once per session), the real-world fixtures, and a
copy of the workflow for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.tokenizer import HF_FILES as TOKENIZER_FILES

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures beside the checkout (CI lays a copy of shared/ there; a user's clone may not)
FIXTURES = REPO.parent / "shared" / "fixtures"
WORKFLOW_PARTS = ["Snakefile", "config.yaml", "schemas", "rules", "scripts", "envs", "profiles", "src", "report"]


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not (FIXTURES / "tokenizers" / "llama" / "tokenizer.model").is_file():
        pytest.skip(f"real-world fixtures not found at {FIXTURES} (they sit in ../shared beside the checkout)")
    return FIXTURES


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo inputs (tiny base, SentencePiece models, two PEFT adapters), made once."""
    from llamaforge.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(out, seed=42, echo=lambda *a: None)
    return out


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
    code = f"import sys; sys.path.insert(0, {str(REPO / 'src')!r}); " + "; ".join(f"import {m}" for m in modules)
    return peak_rss([sys.executable, "-c", code])


def run_script(name: str, *args, check: bool = False, env_extra: dict | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """Run scripts/<name> as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc




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
            rows = f.get_slice("base_model.model.model.embed_tokens.weight").get_shape()[0]
        model.resize_token_embeddings(rows, mean_resizing=False)
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, lora).merge_and_unload()
    model.to(dtype or torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, out / name)
    return out
