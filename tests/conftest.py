"""Shared fixtures: the demo inputs (generated once per session), the real-world fixtures, and the
inputs of the export and import tests. Helpers (runners, memory, builders) are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FIXTURES, build_inputs, clone_build, copy_workflow, snakemake



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


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Merged demo models (one sharded), a GQA model and a tied-embedding one, built once."""
    return build_inputs(str(tmp_path_factory.getbasetemp() / "inputs"))


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> Path:
    """A fresh clone's `snakemake --cores 2` (the README's quickstart), built once per session. Tests
    that change or add files work on `clone_build(demo_build, ...)` (mtimes kept: just as finished)."""
    wf = copy_workflow(tmp_path_factory.mktemp("demo-build") / "llamaforge")
    snakemake(wf, "--cores", "2", timeout=1200)
    return wf


@pytest.fixture(scope="module")
def built(demo_build, tmp_path_factory) -> Path:
    """This module's own copy of the built demo (see demo_build)."""
    return clone_build(demo_build, tmp_path_factory.mktemp("built") / "llamaforge")
