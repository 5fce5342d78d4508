"""A configured importance matrix in the workflow (issue 23), on a copy of the built demo: the
imatrix rule makes it with llama.cpp's tools, the quantized export takes it, and it is rebuilt when
its calibration text or the model changes, and only then (Snakemake's plan, `-n`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_build")]  # one worker, one build

IMATRIX = "exports/demo/demo.imatrix.gguf"
Q4 = "exports/demo/demo-q4_k_m.gguf"


def plan(wf: Path, *targets: str, overlay: str = "imatrix.yaml") -> set[str]:
    """The rules Snakemake would run for `targets` with the overlay config."""
    # targets first: --configfile takes every word after it
    out = snakemake(wf, "-n", "--cores", "2", *targets, "--configfile", overlay,
                    merge_output=True).stdout
    return set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.M))


def test_the_imatrix_rebuilds_when_its_text_or_the_model_changes_and_only_then(built):
    from llamaforge.export import tools

    if not tools.built():
        if tools.missing_build_tools() and os.environ.get("CI") != "true":
            pytest.skip("no CMake or C++ compiler to build llama.cpp's tools")
        tools.build_tools(jobs=2)
    wf = built
    # a type llama.cpp makes only with a matrix, in a model without one: one line while parsing
    (wf / "bad.yaml").write_text(yaml.safe_dump({"models": {"demo": {"exports": ["hf", "gguf-iq2_xs"]}}}))
    proc = snakemake(wf, "-n", "--configfile", "bad.yaml", check=False)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("llamaforge: error:")]
    assert proc.returncode != 0 and errors == ["llamaforge: error: config.yaml: models.demo.exports: llama.cpp makes "
                                               "gguf-iq2_xs only with an importance matrix. Fix: configure one "
                                               "(imatrix: {text: PATH} under models.demo), or choose another type"]
    calib = wf / "resources" / "calibration.txt"
    calib.write_bytes((REPO / "src" / "llamaforge" / "data" / "calibration_text.txt").read_bytes())
    overlay = {"models": {"demo": {"imatrix": {"text": "resources/calibration.txt", "chunks": 2}}}}
    (wf / "imatrix.yaml").write_text(yaml.safe_dump(overlay))
    before = plan(wf, Q4)
    assert {"imatrix", "quantize_gguf"} <= before and "build_tools" not in before and "merge_lora" not in before
    snakemake(wf, "--cores", "2", Q4, "--configfile", "imatrix.yaml")
    import gguf

    q4 = gguf.GGUFReader(wf / Q4)
    assert bytes(q4.fields["quantize.imatrix.file"].parts[-1]).decode() == IMATRIX
    assert plan(wf, Q4, IMATRIX) == set()
    # unrelated settings: another evaluation text, more exports, generation settings
    other = {"models": {"demo": {"imatrix": {"text": "resources/calibration.txt", "chunks": 2},
                                 "exports": ["hf", "gguf-f16", "gguf-q4_k_m", "gguf-q3_k_m"]}},
             "eval": {"text": "resources/calibration2.txt", "generation": {"max_new_tokens": 7}}}
    (wf / "resources" / "calibration2.txt").write_text("another text\n")
    (wf / "other.yaml").write_text(yaml.safe_dump(other))
    assert "imatrix" not in plan(wf, Q4, IMATRIX, "exports/demo/demo-q3_k_m.gguf", overlay="other.yaml")
    # the model changes: an adapter's weights (newer) -> merge, F16, matrix, export
    lora = wf / "resources" / "demo" / "lora_alpaca_plus" / "adapter_model.safetensors"
    st = lora.stat()
    os.utime(lora, (st.st_atime, st.st_mtime + 3600))
    assert {"merge_lora", "export_gguf", "imatrix", "quantize_gguf"} <= plan(wf, Q4)
    os.utime(lora, (st.st_atime, st.st_mtime))
    assert plan(wf, Q4, IMATRIX) == set()
    # the calibration text changes -> the matrix and the export, nothing upstream
    calib.write_text(calib.read_text(encoding="utf-8") + "\nOne more line.\n", encoding="utf-8")
    assert plan(wf, Q4) == {"imatrix", "quantize_gguf"}
