"""Importance-matrix quantization (issue 23): llama.cpp's own llama-imatrix and llama-quantize, built
once per llama-cpp-python version (export.tools), behind scripts/imatrix.py, export_gguf.py --imatrix
and the quality table's side-by-side columns.

Fast tier: the refusals (one line, before any work) and the cache's bookkeeping. Slow tier, on
SmolLM2-135M-Instruct merged with a LoRA: the matrix equals llama-imatrix's, every imatrix export
equals llama-quantize --imatrix's tensor for tensor with its provenance keys, the imatrix Q4_K_M is
clearly closer to the F16 than the plain one on a text the calibration never saw, and an IQ4_XS
answers the Paris question. The tools are built once (cached; .ci/run builds them first).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, run_script

DATA = REPO / "src" / "llamaforge" / "data"


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("llamaforge: error: "), proc.stderr
    return lines[0]


# ---- fast tier ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "iq3_xxs", "q2_k_s"])
def test_types_llama_cpp_makes_only_with_an_imatrix_are_refused_without_one(tmp_path, qtype):
    """Refused in one line before any work: not even the (missing) model folder is looked at."""
    out = tmp_path / "x.gguf"
    proc = run_script("export_gguf.py", "--model", tmp_path / "no-model", "--output", out, "--outtype", qtype)
    line = one_error_line(proc)
    assert f"makes {qtype} only with an importance matrix" in line and "--imatrix" in line
    assert list(tmp_path.iterdir()) == []


def test_the_iq_types_and_their_config_names_are_accepted():
    import yaml

    from llamaforge.export.quantize import LLAMA_CPP_TYPES, NEEDS_IMATRIX

    wanted = {"iq4_xs", "iq4_nl", "iq3_m", "iq3_xxs", "iq2_m", "iq2_xs", "iq2_xxs"}
    assert wanted <= set(LLAMA_CPP_TYPES) and set(NEEDS_IMATRIX) <= set(LLAMA_CPP_TYPES)
    assert {"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"} <= set(NEEDS_IMATRIX)
    assert not {"iq4_xs", "iq4_nl", "iq3_m", "q4_k_m"} & set(NEEDS_IMATRIX)
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    model = schema["properties"]["models"]["additionalProperties"]["properties"]
    assert {f"gguf-{t}" for t in LLAMA_CPP_TYPES} <= set(model["exports"]["items"]["enum"])
    assert set(model["imatrix"]["properties"]) == {"text", "chunks"}


def test_the_tools_not_built_is_one_line_naming_the_command(tmp_path):
    env = {"LLAMAFORGE_TOOLS_DIR": str(tmp_path / "tools")}
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    proc = run_script("imatrix.py", "--model", tmp_path / "m", "--text", text, "--output", tmp_path / "m.imatrix.gguf",
                      env_extra=env)
    line = one_error_line(proc)
    assert "llama-imatrix" in line and "is not built" in line and "scripts/build_tools.py" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_without_cmake_the_build_is_one_line(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare), "LLAMAFORGE_TOOLS_DIR": str(tmp_path / "tools"), "CC": "", "CXX": ""}
    proc = subprocess.run([os.sys.executable, str(REPO / "scripts" / "build_tools.py")], capture_output=True,
                          text=True, env=env)
    line = one_error_line(proc)
    assert "needs cmake and a C compiler and a C++ compiler" in line and "apt-get install cmake" in line
    assert not (tmp_path / "tools").exists()


def test_an_unfinished_build_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    from llamaforge.export import tools

    monkeypatch.setenv("LLAMAFORGE_TOOLS_DIR", str(tmp_path))
    d = tools.build_dir("9.9.9")
    (d / "bin").mkdir(parents=True)
    for t in tools.TOOLS:
        (d / "bin" / t).write_text("#!/bin/sh\n")
        (d / "bin" / t).chmod(0o755)
    assert not tools.built("9.9.9")  # every tool, but no BUILD.json: killed before the rename
    (d / tools.STAMP).write_text("{}")
    assert tools.built("9.9.9")
    (d / "bin" / "llama-quantize").unlink()
    assert not tools.built("9.9.9")
    assert tools.stamp_path("9.9.9") == tmp_path / "9.9.9" / "BUILD.json"


def _record(tmp_path: Path, text: Path) -> Path:
    import hashlib

    imatrix = tmp_path / "m.imatrix.gguf"
    imatrix.write_bytes(b"GGUF")
    (tmp_path / "m.imatrix.gguf.json").write_text(json.dumps(
        {"llamaforge": "imatrix", "text": str(text), "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest()}))
    return imatrix



def test_a_failing_tool_is_one_line_with_its_last_words_and_its_log_kept(tmp_path, monkeypatch, capsys):
    """llama-imatrix / llama-quantize failing: one error line with the tool's last line of output and
    the path of its whole log (kept in a temporary file), not the tool's log poured onto stderr."""
    from llamaforge.errors import LlamaforgeError
    from llamaforge.export import tools

    fake = tmp_path / "llama-fake"
    fake.write_text("#!/bin/sh\necho 'loading model'\necho 'E compute_imatrix: only 3 tokens' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(tools, "tool", lambda name: str(fake))
    with pytest.raises(LlamaforgeError) as e:
        tools.run_tool("llama-imatrix", ["-m", "x.gguf"], "computing the importance matrix", tmp_path / "t.txt",
                       "give a longer text", echo=lambda *a: None)
    msg = str(e.value)
    assert "llama-imatrix failed (computing the importance matrix, exit status 3: E compute_imatrix: only 3 tokens;" in msg
    log = Path(msg.split("its log: ")[1].split(")")[0])
    try:
        assert log.read_text().splitlines() == [f"{fake} -m x.gguf", "loading model", "E compute_imatrix: only 3 tokens"]
    finally:
        log.unlink()
    assert capsys.readouterr().err == ""

def test_the_quality_table_refuses_the_calibration_text(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes((DATA / "calibration_text.txt").read_bytes())
    imatrix = _record(tmp_path, calib)
    out = tmp_path / "gguf.json"
    proc = run_script("evaluate.py", "gguf-quality", "--model", tmp_path / "m", "--gguf", tmp_path / "x.gguf",
                      "--text", calib, "--imatrix", imatrix, "--output", out)
    line = one_error_line(proc)
    assert "the evaluation text is the calibration text" in line and "eval.text" in line
    assert not out.exists()
    # the bundled calibration text is not the bundled evaluation text
    assert (DATA / "calibration_text.txt").read_bytes() != (DATA / "eval_text.txt").read_bytes()


def test_the_bundled_calibration_text_mixes_chinese_and_english():
    text = (DATA / "calibration_text.txt").read_text(encoding="utf-8")
    han = sum("\u4e00" <= c <= "\u9fff" for c in text)
    latin = sum(c.isascii() and c.isalpha() for c in text)
    assert han > 1200 and latin > 3000 and len(text.encode()) > 8000


def test_side_by_side_pairs_each_type_and_shows_a_loss_as_measured():
    from llamaforge.evaluate.gguf_eval import side_by_side

    def row(outtype, imatrix, ppl, kl):
        return {"outtype": outtype, "imatrix": "m.imatrix.gguf" if imatrix else None, "file": f"{outtype}.gguf",
                "path": f"{'i' if imatrix else 'p'}/{outtype}.gguf", "perplexity": ppl, "kl_f16": kl, "kl_mean": kl,
                "top1_agreement": 0.9, "bits_per_weight": 4.8}

    rows = [row("f16", False, 10.0, 0.0), row("q4_k_m", True, 10.5, 0.03), row("q2_k", True, 14.0, 0.3),
            row("q4_k_m", False, 10.9, 0.05), row("q2_k", False, 13.0, 0.2), row("iq2_xs", True, 20.0, 0.5)]
    pairs = {p["outtype"]: p for p in side_by_side(rows)}
    assert sorted(pairs) == ["iq2_xs", "q2_k", "q4_k_m"]
    assert pairs["q4_k_m"]["kl_f16_change"] == pytest.approx(-0.02)
    assert pairs["q2_k"]["perplexity_change"] == pytest.approx(1.0)  # worse with the matrix: shown
    assert pairs["iq2_xs"]["plain"] is None and "kl_f16_change" not in pairs["iq2_xs"]


# ---- slow tier: SmolLM2-135M-Instruct + a LoRA, against the tools called bare ----------------------


@pytest.fixture(scope="module")
def tools_built():
    """llama.cpp's tools of the installed llama-cpp-python, built once (cached; CI prebuilds them)."""
    from llamaforge.export import tools

    if not tools.built():
        if tools.missing_build_tools() and os.environ.get("CI") != "true":
            pytest.skip("no CMake or C++ compiler to build llama.cpp's tools")
        tools.build_tools(jobs=2)
    return {t: tools.tool(t) for t in tools.TOOLS}


@pytest.fixture(scope="module")
def smol(tmp_path_factory, tools_built):
    """SmolLM2-135M-Instruct merged with a LoRA (a small real update), its F16 GGUF and its matrix."""
    import torch
    from families import make_lora, smollm2
    from safetensors.torch import load_file, save_file

    tmp = tmp_path_factory.mktemp("smol-imatrix")
    base = smollm2()
    lora = make_lora(base, tmp / "lora", rank=2)
    w = load_file(lora / "adapter_model.safetensors")
    save_file({k: v * 0.1 if "lora_B" in k else v for k, v in w.items()}, lora / "adapter_model.safetensors")
    merged = tmp / "merged"
    run_script("merge_lora.py", "--base", base, "--lora", lora, "--output", merged, "--dtype", "float16", check=True)
    f16 = tmp / "smol-f16.gguf"
    run_script("export_gguf.py", "--model", merged, "--output", f16, "--outtype", "f16", "--no-modelfile", check=True)
    calib = tmp / "calibration.txt"  # English prose and code: the text SmolLM2 reads best
    calib.write_bytes((DATA / "calibration_text.txt").read_bytes())
    imatrix = tmp / "smol.imatrix.gguf"
    run_script("imatrix.py", "--model", merged, "--from-f16", f16, "--text", calib, "--output", imatrix,
               "--chunks", "4", "--threads", "2", check=True)
    assert torch  # imported for the LoRA's tensors
    return {"tmp": tmp, "merged": merged, "f16": f16, "calib": calib, "imatrix": imatrix}


def gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def gguf_value(path: Path, key: str):
    import gguf

    f = gguf.GGUFReader(path).fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(v[0])


@pytest.mark.slow
def test_the_matrix_is_llama_imatrixs_and_records_the_text(smol, tools_built):
    from llamaforge.export.imatrix import imatrix_args

    bare = smol["tmp"] / "bare.imatrix.gguf"
    subprocess.run([tools_built["llama-imatrix"], *imatrix_args(smol["f16"], smol["calib"], bare, 4, 512, 2)],
                   check=True, capture_output=True)
    ours = gguf_tensors(smol["imatrix"])
    rec = json.loads((smol["tmp"] / "smol.imatrix.gguf.json").read_text())
    # in_sum2 + counts of each matrix: 7 per layer x 30 layers (and the tied output, if llama.cpp counts it)
    assert ours == gguf_tensors(bare) and len(ours) == 2 * rec["entries"] >= 2 * 30 * 7
    assert gguf_value(smol["imatrix"], "imatrix.chunk_count") == gguf_value(bare, "imatrix.chunk_count") == 4
    import hashlib

    assert rec["text_sha256"] == hashlib.sha256(smol["calib"].read_bytes()).hexdigest()
    assert rec["f16_sha256"] == hashlib.sha256(smol["f16"].read_bytes()).hexdigest()


@pytest.mark.slow
def test_imatrix_exports_are_llama_quantizes_and_closer_to_the_f16(smol, tools_built):
    """Q4_K_M and IQ4_XS with the matrix: tensor for tensor llama-quantize --imatrix's, with its
    quantize.imatrix.* keys; on a held-out text the imatrix Q4_K_M is clearly closer to the F16
    than the plain one; the IQ4_XS answers the Paris question in llama.cpp."""
    from families import llama_cpp_model

    tmp, files = smol["tmp"], {}
    for q in ("q4_k_m", "iq4_xs"):
        out = tmp / f"smol-{q}.gguf"
        run_script("export_gguf.py", "--model", smol["merged"], "--from-f16", smol["f16"], "--output", out,
                   "--outtype", q, "--imatrix", smol["imatrix"], "--threads", "2", "--no-modelfile", check=True)
        bare = tmp / f"bare-{q}.gguf"
        subprocess.run([tools_built["llama-quantize"], "--imatrix", smol["imatrix"], smol["f16"], bare, q.upper(), "2"],
                       check=True, capture_output=True)
        assert gguf_tensors(out) == gguf_tensors(bare), q
        assert gguf_value(out, "quantize.imatrix.file") == os.fspath(smol["imatrix"])
        assert gguf_value(out, "quantize.imatrix.dataset") == os.fspath(smol["calib"])
        rec = json.loads((tmp / "smol.imatrix.gguf.json").read_text())
        assert gguf_value(out, "quantize.imatrix.entries_count") == rec["entries"]
        assert gguf_value(out, "quantize.imatrix.chunks_count") == 4
        files[q] = out
    plain = tmp / "plain" / "smol-q4_k_m.gguf"
    run_script("export_gguf.py", "--model", smol["merged"], "--from-f16", smol["f16"], "--output", plain,
               "--outtype", "q4_k_m", "--threads", "2", "--no-modelfile", check=True)
    held_out = tmp / "held_out.txt"  # the demo tokenizer's English training prose: the calibration never saw it
    held_out.write_text((DATA / "english.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    prompts = tmp / "prompts.txt"  # the Hugging Face agreement is not what this test is about: two prompts
    prompts.write_text("What is the capital of France?\nName a colour.\n")
    out = tmp / "gguf.json"
    run_script("evaluate.py", "gguf-quality", "--model", smol["merged"], "--gguf", files["q4_k_m"], "--gguf", plain,
               "--text", held_out, "--prompts", prompts, "--max-length", "256", "--stride", "256", "--f16", smol["f16"],
               "--imatrix", smol["imatrix"], "--threads", "2", "--output", out, check=True)
    res = json.loads(out.read_text())
    pair = next(p for p in res["side_by_side"] if p["outtype"] == "q4_k_m")
    # measured (SmolLM2 alone, 8 chunks, all of english.txt): KL from the F16 0.069 with the matrix, 0.112 without
    assert pair["imatrix"]["kl_f16"] < 0.85 * pair["plain"]["kl_f16"], pair
    assert pair["kl_f16_change"] < 0 and res["imatrix"]["text_sha256"] == json.loads(
        (tmp / "smol.imatrix.gguf.json").read_text())["text_sha256"]
    llm = llama_cpp_model(files["iq4_xs"], n_ctx=256, n_threads=2)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


@pytest.mark.parametrize("pkg_info", ["Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.0.1\n", None])
def test_a_source_of_another_llama_cpp_python_version_is_refused(tmp_path, pkg_info):
    """--source must be the installed llama-cpp-python's own sdist: another version's (or a tree whose
    version can't be told) would be built and cached as this version's tools. One line, nothing built."""
    src = tmp_path / "src"
    (src / "vendor" / "llama.cpp" / "tools" / "quantize").mkdir(parents=True)
    (src / "vendor" / "llama.cpp" / "ggml").mkdir()
    if pkg_info:
        (src / "PKG-INFO").write_text(pkg_info)
    out = tmp_path / "tools"
    r = run_script("build_tools.py", "--source", src, env_extra={"LLAMAFORGE_TOOLS_DIR": str(out)})
    assert r.returncode == 1 and r.stderr.count("llamaforge: error:") == 1 and "Traceback" not in r.stderr
    assert ("llama-cpp-python 0.0.1's source" if pkg_info else "version is unknown") in r.stderr
    assert not any(out.rglob("BUILD.json"))
