"""4-6 bit GGUF by llama.cpp's own quantizer (issue 13, first part): byte-identical to llama-quantize
of llamaforge's F16 GGUF, loadable by llama.cpp, with the fallbacks reported and an Ollama Modelfile."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from families import llama_cpp_model, read_gguf, spm_tokenizer
from helpers import run_script

# q4_k_m in the fast tier; the other three (same code path, llama.cpp's other kernels) in the slow one
QTYPES = [pytest.param("q4_0", marks=pytest.mark.slow), "q4_k_m", pytest.param("q5_k_m", marks=pytest.mark.slow),
          pytest.param("q6_k", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def model256(tmp_path_factory):
    """A merged model made elsewhere: LlamaForCausalLM, hidden 256 (K-quants apply to every matrix),
    GQA, the real LLaMA SentencePiece tokenizer; and llamaforge's F16 GGUF of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(root / "model")
    spm_tokenizer(root / "model")
    f16 = root / "f16.gguf"
    run_script("export_gguf.py", "--model", root / "model", "--output", f16, "--outtype", "f16", check=True)
    return root / "model", f16


def llama_quantize(src, dst, qtype):
    """What llama-quantize SRC DST QTYPE does: llama_model_quantize with the default parameters."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    assert llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) == 0
    return dst


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_exports_equal_llama_quantize_of_our_f16_and_load(model256, qtype, tmp_path):
    model, f16 = model256
    direct, from_f16 = tmp_path / f"m-{qtype}.gguf", tmp_path / f"f-{qtype}.gguf"
    proc = run_script("export_gguf.py", "--model", model, "--output", direct, "--outtype", qtype, check=True)
    assert "fell back to another type" not in proc.stdout  # hidden 256: every matrix takes the K-quant
    assert ("no tensor fell back" in proc.stdout) == (qtype != "q4_0")
    run_script("export_gguf.py", "--model", model, "--output", from_f16, "--outtype", qtype, "--from-f16", f16,
               check=True)
    ref = llama_quantize(f16, tmp_path / "ref.gguf", qtype)
    meta, tensors = read_gguf(direct)
    ref_meta, ref_tensors = read_gguf(ref)
    assert tensors == ref_tensors  # names, types, shapes, bytes
    assert read_gguf(from_f16)[1] == ref_tensors
    assert meta == ref_meta and meta["llamaforge.version"]  # llama.cpp keeps llamaforge's key: it knows its file
    types = {t for t, _, _ in tensors.values()}
    assert {"q4_0": "Q4_0", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[qtype] in types
    llm = llama_cpp_model(direct, n_ctx=64, logits_all=True, n_threads=2)
    from llamaforge.model.prompts import ALPACA_CHAT_TEMPLATE

    assert llm.metadata["tokenizer.chat_template"] == ALPACA_CHAT_TEMPLATE  # llama.cpp's chat mode: Alpaca
    llm.eval([1, 15043, 3186, 29892])
    assert torch.isfinite(torch.tensor(llm.scores[:4])).all()
    mf = (tmp_path / f"m-{qtype}.Modelfile").read_text()
    assert f"FROM ./m-{qtype}.gguf" in mf and 'TEMPLATE """' in mf and "### Instruction:" in mf
    assert (tmp_path / f"m-{qtype}.gguf.sha256").read_text().split()[1] == f"m-{qtype}.gguf"


def test_k_quant_fallbacks_are_reported(tmp_path):
    """Rows that are not a multiple of 256 (hidden 64) make llama.cpp fall back; the export says which."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(tmp_path / "model")
    spm_tokenizer(tmp_path / "model")
    proc = run_script("export_gguf.py", "--model", tmp_path / "model", "--output", tmp_path / "x.gguf",
                      "--outtype", "q4_k_m", check=True)
    assert "fell back to another type" in proc.stdout and "blk.0.ffn_up.weight Q5_0" in proc.stdout


def test_without_llama_cpp_a_quantized_type_is_one_line(model256, tmp_path):
    blocker = tmp_path / "block" / "llama_cpp"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('llama_cpp is blocked in this test')\n")
    env = {"PYTHONPATH": str(blocker.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_script("export_gguf.py", "--model", model256[0], "--output", tmp_path / "x.gguf", "--outtype",
                      "q4_k_m", env_extra=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "pip install 'llamaforge[gguf]'" in lines[0]
    assert not (tmp_path / "x.gguf").exists()
    ok = run_script("export_gguf.py", "--model", model256[0], "--output", tmp_path / "y.gguf", "--outtype", "q8_0",
                    env_extra=env)
    assert ok.returncode == 0, ok.stderr  # everything else still builds


def test_modelfile_templates_follow_the_chat_template():
    from llamaforge.export.modelfile import modelfile_text

    chatml = modelfile_text("m.gguf", "{{ '<|im_start|>' + m['role'] }}", {"temperature": 0.2, "num_predict": 64})
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in chatml and 'PARAMETER stop "<|im_end|>"' in chatml
    assert "PARAMETER temperature 0.2" in chatml and "PARAMETER num_predict 64" in chatml
    llama3 = modelfile_text("m.gguf", "<|start_header_id|>{{ role }}<|end_header_id|>", {})
    assert 'PARAMETER stop "<|eot_id|>"' in llama3
    alpaca = modelfile_text("m.gguf", None, {})
    assert "### Instruction:\n\n{{ .Prompt }}\n\n### Response:\n\n" in alpaca
    assert 'PARAMETER stop "### Instruction:"' in alpaca


@pytest.mark.slow
def test_quality_table_scores_a_corrupted_gguf_worse(model256, tmp_path):
    """eval/{model}/gguf.json, measured with llama.cpp: the sound F16 agrees with the Hugging Face model
    (KL ~ 0, top-1 1.0); the same file with one tensor overwritten by noise scores worse on both."""
    import json
    import shutil

    import gguf
    import numpy as np

    model, f16 = model256
    bad = tmp_path / "bad-f16.gguf"
    shutil.copyfile(f16, bad)
    t = next(t for t in gguf.GGUFReader(bad).tensors if t.name == "blk.0.ffn_down.weight")
    noise = np.random.default_rng(0).normal(0, 0.5, int(t.n_elements)).astype(np.float16)
    with open(bad, "r+b") as f:
        f.seek(int(t.data_offset))
        f.write(noise.tobytes())
    q6 = tmp_path / "m-q6_k.gguf"
    run_script("export_gguf.py", "--model", model, "--output", q6, "--outtype", "q6_k", "--from-f16", f16, check=True)
    out = tmp_path / "gguf.json"
    run_script("evaluate.py", "gguf-quality", "--model", model, "--gguf", f16, "--gguf", q6, "--gguf", bad,
               "--max-length", "64", "--stride", "32", "--output", out, check=True)
    res = json.loads(out.read_text())
    sound, quant, broken = res["exports"]
    assert res["llamaforge"] == "gguf_quality" and sound["outtype"] == "f16" and quant["outtype"] == "q6_k"
    assert sound["kl_mean"] < 1e-4 and sound["top1_agreement"] > 0.97
    assert abs(sound["perplexity"] - res["reference"]["perplexity"]) / res["reference"]["perplexity"] < 0.01
    assert 6 < quant["bits_per_weight"] < 7 < 15 < sound["bits_per_weight"] < 17
    assert sound["kl_mean"] < quant["kl_mean"] < broken["kl_mean"]
    assert broken["top1_agreement"] < sound["top1_agreement"]
    png = tmp_path / "gguf_quality.png"
    run_script("evaluate.py", "gguf-plot", "--quality", out, "--output", png, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_quality_table_on_real_weights_shows_what_a_quantization_cost(tmp_path):
    """SmolLM2-135M-Instruct (hidden 576: not a multiple of 256, so K-quant tensors fall back one by
    one): the table shows Q8_0 close to the model and the K-quants further away, with their fallbacks,
    and llama.cpp's Q8_0 still answers the question."""
    import json

    from families import smollm2

    model = smollm2()
    f16 = tmp_path / "smol-f16.gguf"
    run_script("export_gguf.py", "--model", model, "--output", f16, "--outtype", "f16", check=True)
    files = [f16]
    for q in ("q8_0", "q5_k_m", "q4_k_m"):
        out = tmp_path / f"smol-{q}.gguf"
        args = ["--from-f16", f16] if q != "q8_0" else []
        proc = run_script("export_gguf.py", "--model", model, "--output", out, "--outtype", q, *args, check=True)
        if q != "q8_0":
            assert "fell back to another type" in proc.stdout
        files.append(out)
    res_path = tmp_path / "gguf.json"
    run_script("evaluate.py", "gguf-quality", "--model", model, *[a for f in files for a in ("--gguf", f)],
               "--max-length", "128", "--stride", "64", "--output", res_path, check=True)
    rows = {r["outtype"]: r for r in json.loads(res_path.read_text())["exports"]}
    # measured here: KL f16 3e-6, q8_0 0.005, q4_k_m 0.07, q5_k_m 0.10 (its 181 fallback tensors cost more
    # than its extra bits buy): the K-quants of this model are an order of magnitude further away
    assert rows["f16"]["kl_mean"] < rows["q8_0"]["kl_mean"]
    assert 5 * rows["q8_0"]["kl_mean"] < min(rows["q4_k_m"]["kl_mean"], rows["q5_k_m"]["kl_mean"])
    assert rows["q4_k_m"]["fallbacks"] > 0 and rows["q8_0"]["fallbacks"] == 0
    assert rows["q8_0"]["top1_agreement"] > 0.9
    assert rows["q4_k_m"]["bits_per_weight"] < rows["q8_0"]["bits_per_weight"] < rows["f16"]["bits_per_weight"]
    llm = llama_cpp_model(files[1], n_ctx=256, n_threads=2)
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    assert "Paris" in answer


def test_the_alpaca_chat_template_renders_as_llamaforges_inference():
    """The chat template written into GGUFs of tokenizers without one renders exactly the prompts of
    llamaforge's Alpaca template (single turn and history), so llama.cpp's chat mode matches it."""
    import jinja2

    from llamaforge.generate import TEMPLATES
    from llamaforge.model.prompts import ALPACA_CHAT_TEMPLATE

    t = jinja2.Template(ALPACA_CHAT_TEMPLATE)
    alpaca = TEMPLATES["alpaca"]
    assert t.render(messages=[{"role": "user", "content": "为什么？"}]) == alpaca.prompt("为什么？")
    history = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "Q2"}]
    assert t.render(messages=history) == alpaca.chat([("Q1", "A1")], "Q2")


def test_quality_table_of_the_demo_merge(inputs, tmp_path):
    """The fast tier's gguf-quality: the demo's merge (hidden 256, vocabulary 1190) as F16, Q8_0 and
    Q4_K_M (from the F16), measured by llama.cpp against the Hugging Face model; the slow tier does the
    same on a corrupted file and on real weights."""
    import json

    model = inputs["merged"]
    f16, q8, q4 = tmp_path / "d-f16.gguf", tmp_path / "d-q8_0.gguf", tmp_path / "d-q4_k_m.gguf"
    run_script("export_gguf.py", "--model", model, "--output", f16, "--outtype", "f16", check=True)
    run_script("export_gguf.py", "--model", model, "--output", q8, "--outtype", "q8_0", check=True)
    run_script("export_gguf.py", "--model", model, "--output", q4, "--outtype", "q4_k_m", "--from-f16", f16,
               check=True)
    out, text = tmp_path / "gguf.json", tmp_path / "text.txt"
    text.write_text("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。The quick brown fox jumps over the lazy dog. "
                    "床前明月光，疑是地上霜。举头望明月，低头思故乡。A journey of a thousand miles begins with one step.\n")
    run_script("evaluate.py", "gguf-quality", "--model", model, "--gguf", f16, "--gguf", q8, "--gguf", q4,
               "--text", text, "--max-length", "64", "--stride", "32", "--output", out, check=True)
    res = json.loads(out.read_text())
    rows = {r["outtype"]: r for r in res["exports"]}
    assert sorted(rows) == ["f16", "q4_k_m", "q8_0"]
    assert rows["f16"]["kl_mean"] < 1e-4 and rows["f16"]["top1_agreement"] > 0.97
    assert rows["f16"]["kl_mean"] < rows["q8_0"]["kl_mean"] < rows["q4_k_m"]["kl_mean"]
    assert rows["q4_k_m"]["bits_per_weight"] < rows["q8_0"]["bits_per_weight"] < rows["f16"]["bits_per_weight"]
    ref = res["reference"]["perplexity"]
    assert abs(rows["f16"]["perplexity"] - ref) / ref < 0.01


def test_from_f16_reads_the_f16_it_just_wrote_once(demo, tmp_path, monkeypatch):
    """The export remembers the hash of the F16 it wrote (hashed as written), so --from-f16 of it does
    not read the whole file again before llama.cpp does (a 13 GB F16 per quantized type)."""
    from llamaforge.files import hashing as fsutil
    from llamaforge.export.gguf_check import check_f16
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.source import open_model
    from llamaforge.export.gguf_meta import load_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMAFORGE_NO_HASH_CACHE", raising=False)
    monkeypatch.setattr(fsutil, "_CACHE_MIN", 0)
    f16 = tmp_path / "m-f16.gguf"
    digest = export_gguf(demo / "base", f16, "f16", echo=lambda *a: None)

    def no_rehash(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(fsutil, "sha256_file", no_rehash)
    m = open_model(demo / "base")
    try:
        info = check_f16(load_gguf(), f16, m)
    finally:
        m.close()
    assert info["bytes"] == f16.stat().st_size
    assert fsutil.sha256_cached(f16) == digest
    f16.write_bytes(f16.read_bytes())  # rewritten in place: its ctime moves, so it is hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        fsutil.sha256_cached(f16)


def test_from_f16_imports_neither_torch_nor_transformers(demo, tmp_path):
    """A quantized export from llamaforge's F16 GGUF reads that GGUF and the model folder's metadata
    only: no tensor of the model, no torch, no transformers (5 s of imports saved per quantized type),
    and its output equals the one made while writing the F16 (byte for byte)."""
    import subprocess
    import sys
    from pathlib import Path

    from llamaforge.export import export_gguf

    f16 = tmp_path / "m-f16.gguf"
    export_gguf(demo / "base", f16, "f16", echo=lambda *a: None)
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_gguf.py"
    probe = ("import atexit, runpy, sys; sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0]); "
             "atexit.register(lambda: print('MODULES', sorted(m for m in ('torch', 'transformers', 'safetensors') "
             "if m in sys.modules))); script = sys.argv[1]; sys.argv = sys.argv[1:]; "
             "runpy.run_path(script, run_name='__main__')")
    out = tmp_path / "m-q4_k_m.gguf"
    done = subprocess.run([sys.executable, "-c", probe, str(script), "--model", str(demo / "base"), "--outtype",
                           "q4_k_m", "--from-f16", str(f16), "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODULES []" in done.stdout.splitlines()
    direct = tmp_path / "direct-q4_k_m.gguf"
    export_gguf(demo / "base", direct, "q4_k_m", echo=lambda *a: None)
    assert out.read_bytes() == direct.read_bytes()
