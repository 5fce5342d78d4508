"""Evaluation (issue 5): merge equivalence (and its failure on a corrupted merge), perplexity against
a hand computation, tokenizer statistics, summary and plots, on the demo models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import peft_merge, run_script

from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate import equivalence, perplexity, plot, sliding_window_nll, summarize, tokenizer_stats

def quiet(*args):
    pass


@pytest.fixture(scope="module")
def loras(demo) -> list[Path]:
    return [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]


@pytest.fixture(scope="module")
def merged32(demo, loras, tmp_path_factory) -> Path:
    return peft_merge(demo / "base", loras, demo / "lora_alpaca_plus", tmp_path_factory.mktemp("m32") / "demo")


@pytest.fixture(scope="module")
def merged16(demo, loras, tmp_path_factory) -> Path:
    return peft_merge(demo / "base", loras, demo / "lora_alpaca_plus", tmp_path_factory.mktemp("m16") / "demo",
                      torch.float16)


# ---------------------------------------------------------------------------------------------
# equivalence


def test_equivalence_float32_merge(demo, loras, merged32, tmp_path):
    out = tmp_path / "eq.json"
    r = equivalence(merged32, demo / "base", loras, out, echo=quiet)
    assert r["passed"] is True
    assert r["max_abs_diff"] < 1e-3 and r["top1_agreement"] == 1.0
    assert r["rounding_floor"] == 0.0 and r["allowed"] == 1e-3 and r["merged_dtypes"] == ["float32"]
    assert r["last_adapter_effect"] > 100 * r["allowed"]  # the check can see the last adapter
    assert r["prompts"] == 8 and r["positions"] > 100 and r["vocab"] == 1190
    assert json.loads(out.read_text()) == r


def test_equivalence_float16_merge_accounts_for_rounding(demo, loras, merged16):
    r = equivalence(merged16, demo / "base", loras, echo=quiet)
    assert r["passed"] is True and r["merged_dtypes"] == ["float16"]
    assert 0 < r["rounding_floor"] < 0.05
    assert r["allowed"] == pytest.approx(1e-3 + 2 * r["rounding_floor"])
    assert r["max_abs_diff_vs_rounded"] < 1e-4  # the same weights up to an occasional last bit


def corrupt(src: Path, dst: Path, name: str, delta: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    t = tensors[name]
    tensors[name] = (t.float() + delta * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))).to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("which", ["merged32", "merged16"])
def test_equivalence_fails_on_a_corrupted_tensor(demo, loras, which, request, tmp_path):
    bad = corrupt(request.getfixturevalue(which), tmp_path / "bad", "model.layers.1.mlp.down_proj.weight", 0.01)
    out = tmp_path / "eq.json"
    with pytest.raises(LlamaforgeError, match="merge check FAILED") as e:
        equivalence(bad, demo / "base", loras, out, echo=quiet)
    assert str(bad) in str(e.value) and "Fix:" in str(e.value)
    r = json.loads(out.read_text())  # written for inspection
    assert r["passed"] is False and r["max_abs_diff"] > r["allowed"]


def test_equivalence_cli_exit_status(demo, loras, merged32, tmp_path):
    bad = corrupt(merged32, tmp_path / "bad", "model.embed_tokens.weight", 0.01)
    args = ["equivalence", "--base", demo / "base", "--lora", loras[0], "--lora", loras[1]]
    fail = run_script("evaluate.py", *args, "--merged", bad, "--output", tmp_path / "bad.json")
    assert fail.returncode == 1
    err = [line for line in fail.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert len(err) == 1 and "merge check FAILED" in err[0] and "Traceback" not in fail.stderr


def test_equivalence_with_the_wrong_adapters(demo, loras, merged32):
    with pytest.raises(LlamaforgeError, match="1190 embedding rows but base \\+ adapters give 1189"):
        equivalence(merged32, demo / "base", loras[:1], echo=quiet)
    with pytest.raises(LlamaforgeError, match="no adapter"):
        equivalence(merged32, demo / "base", [], echo=quiet)


# ---------------------------------------------------------------------------------------------
# perplexity


def hand_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Token by token: token t is predicted from ids[begin:t], begin = the first window that reaches t
    (a window's own first token has no context there and is skipped)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = 0
            while begin + max_length <= t:  # the first window whose end passes t
                begin += stride
            if begin == t:
                continue
            logits = model(input_ids=torch.tensor([ids[begin:t]])).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[ids[t]])
            n += 1
    return nll, n


@pytest.fixture(scope="module")
def model32(merged32):
    from llamaforge.generate import load_causal_lm

    return load_causal_lm(merged32, torch.float32)


def test_perplexity_equals_a_hand_computation(merged32, model32, tmp_path):
    from llamaforge.generate import load_tokenizer

    text = "白日依山尽，黄河入海流。The cat sat on the mat."
    (tmp_path / "t.txt").write_text(text + "\n", encoding="utf-8")
    ids = load_tokenizer(merged32)(text).input_ids
    assert 15 < len(ids) < 60

    # one window: the plain definition, exp(mean NLL of tokens 1..n-1), and Hugging Face's loss
    r = perplexity(merged32, tmp_path / "t.txt", tmp_path / "p.json", echo=quiet)
    nll, n = hand_nll(model32, ids, 10**6, 512)
    assert r["tokens"] == len(ids) and r["scored_tokens"] == n == len(ids) - 1 and r["windows"] == 1
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    with torch.no_grad():
        loss = model32(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert r["mean_nll"] == pytest.approx(float(loss), rel=1e-5)
    assert r["bits_per_character"] == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)
    assert json.loads((tmp_path / "p.json").read_text())["perplexity"] == r["perplexity"]

    # sliding windows with overlap: every token once, with the context its window gives
    by_hand = {}
    for max_length, stride in [(8, 4), (6, 1), (8, 8)]:
        got = sliding_window_nll(model32, ids, max_length, stride)
        nll, n = by_hand[max_length, stride] = hand_nll(model32, ids, max_length, stride)
        assert got["scored_tokens"] == n
        assert got["nll_sum"] == pytest.approx(nll, rel=1e-5)
        # overlapping windows score every token; without overlap each later window's first is lost
        assert n == len(ids) - 1 - (0 if stride < max_length else got["windows"] - 1)
    r8 = perplexity(merged32, tmp_path / "t.txt", max_length=8, stride=4, echo=quiet)
    assert r8["windows"] == math.ceil((len(ids) - 8) / 4) + 1
    nll8, n8 = by_hand[8, 4]
    assert r8["scored_tokens"] == n8 and r8["nll_sum"] == pytest.approx(nll8, rel=1e-5)
    assert r8["perplexity"] == pytest.approx(math.exp(nll8 / n8), rel=1e-5)


def test_perplexity_errors(merged32, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(LlamaforgeError, match="empty"):
        perplexity(merged32, tmp_path / "empty.txt", echo=quiet)
    (tmp_path / "t.txt").write_text("some text here", encoding="utf-8")
    with pytest.raises(LlamaforgeError, match="stride"):
        perplexity(merged32, tmp_path / "t.txt", max_length=4, stride=0, echo=quiet)


# ---------------------------------------------------------------------------------------------
# tokenizer statistics, summary, plots


def test_tokenizer_stats(demo, tmp_path):
    from llamaforge.generate import load_tokenizer

    lines = ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。", "It was the best of times.", "We had everything."]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    r = tokenizer_stats(demo / "lora_alpaca_plus", demo / "base", tmp_path / "t.txt", tmp_path / "s.json", echo=quiet)
    merged, base = load_tokenizer(demo / "lora_alpaca_plus"), load_tokenizer(demo / "base")
    count = lambda tok, ls: sum(len(tok(s, add_special_tokens=False).input_ids) for s in ls)  # noqa: E731
    chars = sum(map(len, lines))
    assert r["characters"] == chars and r["lines"] == 4 and r["vocab"] == {"base": 512, "merged": 1190}
    assert r["base"]["tokens"] == count(base, lines) and r["merged"]["tokens"] == count(merged, lines)
    assert r["merged"]["chars_per_token"] == pytest.approx(chars / count(merged, lines))
    zh, other = r["by_script"]["chinese"], r["by_script"]["other"]
    assert zh["lines"] == 2 and other["lines"] == 2
    assert zh["merged"]["tokens"] == count(merged, lines[:2]) < zh["base"]["tokens"] == count(base, lines[:2])
    assert other["merged"]["tokens"] == other["base"]["tokens"]  # English is untouched by the merge
    assert 0 < r["token_reduction"] < 1
    # a bare SentencePiece model works as a tokenizer too
    r2 = tokenizer_stats(demo / "lora_alpaca_plus", demo / "sp" / "base.model", tmp_path / "t.txt", echo=quiet)
    assert r2["vocab"]["base"] == 512 and r2["base"]["tokens"] == r["base"]["tokens"]


def test_summary_and_plots(demo, loras, merged32, tmp_path):
    (tmp_path / "t.txt").write_text("白日依山尽，黄河入海流。\nThe cat sat on the mat.\n", encoding="utf-8")
    perplexity(merged32, tmp_path / "t.txt", tmp_path / "ppl.json", echo=quiet)
    tokenizer_stats(merged32, demo / "base", tmp_path / "t.txt", tmp_path / "tok.json", echo=quiet)
    (tmp_path / "pred.json").write_text(json.dumps([{"instruction": "a", "input": "", "prompt": "a", "output": "xy"},
                                                    {"instruction": "b", "input": "", "prompt": "b", "output": ""}]))
    eq = {"passed": True, "max_abs_diff": 2e-7, "mean_abs_diff": 1e-8, "top1_agreement": 1.0, "allowed": 1e-3,
          "tolerance": 1e-3, "rounding_floor": 0.0, "merged_dtypes": ["float32"]}
    (tmp_path / "eq.json").write_text(json.dumps(eq))
    s = summarize("demo", tmp_path / "a" / "summary.json", tmp_path / "pred.json", tmp_path / "ppl.json",
                  tmp_path / "eq.json", tmp_path / "tok.json", echo=quiet)
    assert s["predictions"]["count"] == 2 and s["predictions"]["empty_outputs"] == 1
    assert s["equivalence"]["passed"] is True and s["tokenizer"]["vocab"]["merged"] == 1190
    assert s["tokenizer"]["by_script"]["chinese"]["merged"] < s["tokenizer"]["by_script"]["chinese"]["base"]
    # a second model without adapters: no equivalence
    summarize("base-only", tmp_path / "b" / "summary.json", perplexity_json=tmp_path / "ppl.json",
              tokenizer_stats_json=tmp_path / "tok.json", echo=quiet)
    pngs = [tmp_path / "plots" / f for f in ("tpc.png", "ppl.png", "eq.png")]
    written = plot([tmp_path / "a" / "summary.json", tmp_path / "b" / "summary.json"], *pngs)
    assert written == [str(p) for p in pngs]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == ["eq.png", "ppl.png", "tpc.png"]  # no temp files


# ---------------------------------------------------------------------------------------------
# the package: light to import, every model load through the guarded loader


def test_importing_the_package_imports_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, llamaforge.evaluate\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'transformers', 'matplotlib', 'llama_cpp'}))")
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(src), "PATH": ""}, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_of_the_package_loads_a_model_itself():
    """Models load through llamaforge.generate.load_causal_lm / load_model (config.json checked, hostile pickled
    weights refused), tokenizers through llamaforge's loaders: never transformers' from_pretrained."""
    import ast

    import llamaforge.evaluate as pkg

    for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                assert node.attr != "from_pretrained", f"{f.name}:{node.lineno} calls from_pretrained"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
                raise AssertionError(f"{f.name}:{node.lineno} imports from transformers")


def test_gguf_quality_loads_the_reference_through_the_guarded_loader(demo, tmp_path, monkeypatch):
    import llamaforge.generate

    calls = []

    class Loaded(Exception):
        pass

    def guarded(folder, dtype, device="cpu"):
        calls.append((folder, dtype, device))
        raise Loaded

    from llamaforge.model import ModelFolder

    described = []

    def check_ggufs(model, ggufs):  # open_model's ModelFolder, without GGUF files to check
        described.append(ModelFolder(model))
        return described[-1]

    monkeypatch.setattr("llamaforge.evaluate.gguf_eval._check_ggufs", check_ggufs)
    monkeypatch.setattr(llamaforge.generate, "load_causal_lm", guarded)
    from llamaforge.evaluate import gguf_quality

    with pytest.raises(Loaded):
        gguf_quality(demo / "base", [tmp_path / "x.gguf"], tmp_path / "q.json", echo=quiet)
    # the reference is loaded from the very ModelFolder the GGUF check described: the folder is not read again
    assert [(id(f), f.path) for f, *_ in calls] == [(id(described[0]), demo / "base")]
    assert calls[0][1:] == (torch.float32, "cpu")
