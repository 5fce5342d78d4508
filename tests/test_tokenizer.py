"""Tokenizer merge: byte-exact against the published Chinese-LLaMA/Alpaca files, Hugging Face
behaviour, and errors that leave no output."""

from __future__ import annotations

import hashlib
import json

import pytest
import sentencepiece as spm
from helpers import run_script

from llamaforge.errors import LlamaforgeError
from llamaforge.tokenizer import (
    TEST_SENTENCE,
    build_tokenizer_json,
    load_hf_tokenizer,
    load_proto,
    merge_tokenizers,
)

CHINESE_LLAMA_SHA = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
CHINESE_ALPACA_SHA = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"
POEM = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
POEM_PIECES = "▁白 日 依 山 尽 ， 黄河 入 海 流 。 欲 穷 千里 目 ， 更 上 一层 楼 。".split()
POEM_IDS = [39226, 30325, 33282, 30329, 32555, 30214, 37693, 30752, 30581, 31151, 30267, 33182, 35243,
            40097, 30895, 30214, 31100, 30429, 36966, 32261, 30267]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chinese_llama(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "chinese-llama"
    summary = merge_tokenizers(fixtures / "tokenizers/llama/tokenizer.model", fixtures / "tokenizers/chinese_sp.model",
                               out, echo=lambda *a: None)
    return out, summary


@pytest.fixture(scope="module")
def chinese_alpaca(fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "chinese-alpaca"
    proc = run_script("merge_tokenizers.py", "--base", fixtures / "tokenizers/llama/tokenizer.model",
                      "--extra", fixtures / "tokenizers/chinese_sp.model", "--add-token", "[PAD]",
                      "--output", out, check=True)
    return out, proc.stdout


def test_chinese_llama_tokenizer_is_byte_identical_to_the_published_file(chinese_llama):
    out, summary = chinese_llama
    assert sha256(out / "tokenizer.model") == CHINESE_LLAMA_SHA
    assert summary["merged_pieces"] == 49953
    assert summary["added_pieces"] == 49953 - 32000
    assert summary["test_sentence_tokens"] == {"base": 53, "merged": 37}
    assert summary["chinese_tokens_per_char"]["merged"] < summary["chinese_tokens_per_char"]["base"]


def test_chinese_alpaca_tokenizer_is_byte_identical_and_reports_like_the_original(chinese_alpaca):
    out, stdout = chinese_alpaca
    assert sha256(out / "tokenizer.model") == CHINESE_ALPACA_SHA
    assert load_proto(out / "tokenizer.model").pieces[49953].piece == "[PAD]"
    # what the original script printed, plus tokens per character
    assert "Before: 32000" in stdout
    assert "New model pieces: 49954" in stdout
    assert "Added 17953 pieces" in stdout
    assert "(53 pieces)" in stdout and "(37 pieces)" in stdout
    assert "Tokens per character on the bundled Chinese sample: before" in stdout


def test_autotokenizer_matches_sentencepiece_on_the_published_pieces(chinese_llama):
    out, _ = chinese_llama
    tok = load_hf_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert len(tok) == sp.get_piece_size() == 49953
    assert tok.tokenize(POEM) == POEM_PIECES
    assert tok(POEM).input_ids == [1] + POEM_IDS
    assert tok.tokenize(TEST_SENTENCE) == sp.encode(TEST_SENTENCE, out_type=str)
    assert len(tok.tokenize(TEST_SENTENCE)) == 37
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.decode(tok(POEM).input_ids, skip_special_tokens=True) == POEM
    # transformers' own LlamaTokenizer class reads the same folder the same way
    from transformers import LlamaTokenizer

    assert LlamaTokenizer.from_pretrained(str(out)).tokenize(POEM) == POEM_PIECES


def test_autotokenizer_pad_token_is_the_added_piece(chinese_alpaca):
    out, _ = chinese_alpaca
    tok = load_hf_tokenizer(out)
    assert len(tok) == 49954
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 49953
    assert tok(POEM).input_ids == [1] + POEM_IDS
    batch = tok([POEM, "更上一层楼"], padding=True)
    assert batch.input_ids[1][0] == 49953  # left padding with [PAD]


def test_tokenizer_json_orders_merges_by_sentencepiece_score(demo):
    proto = load_proto(demo / "sp" / "base.model")
    tj = build_tokenizer_json(proto)
    scores = {p.piece: p.score for p in proto.pieces}
    merged_scores = [scores["".join(m)] for m in tj["model"]["merges"]]
    assert merged_scores == sorted(merged_scores, reverse=True)
    assert tj["model"]["byte_fallback"] is True
    assert len(tj["model"]["vocab"]) == len(proto.pieces)


def test_demo_tokenizers_load_and_agree_with_sentencepiece(demo, tmp_path):
    out = tmp_path / "t"
    summary = merge_tokenizers(demo / "sp/base.model", demo / "sp/chinese.model", out, add_tokens=["[PAD]"],
                               echo=lambda *a: None)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert summary["merged_pieces"] == sp.get_piece_size() == len(load_hf_tokenizer(out))
    assert summary["hf_agreement"]["agreement"] == 1.0
    assert json.loads((out / "merge_report.json").read_text())["merged_pieces"] == summary["merged_pieces"]


# --- bad input ------------------------------------------------------------------------------


def test_missing_file_is_named_and_leaves_no_output(demo, tmp_path):
    out = tmp_path / "t"
    proc = run_script("merge_tokenizers.py", "--base", tmp_path / "nope.model", "--extra", demo / "sp/chinese.model",
                      "--output", out)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("llamaforge: error: ") and "nope.model" in lines[-1] and "not found" in lines[-1]
    assert not out.exists()
    assert not list(tmp_path.glob(".t.tmp-*"))


def test_a_file_that_is_not_sentencepiece_is_refused(demo, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0"}')
    with pytest.raises(LlamaforgeError, match="not a SentencePiece model") as e:
        merge_tokenizers(demo / "sp/base.model", bad, tmp_path / "t", echo=lambda *a: None)
    assert str(bad) in str(e.value)
    assert not (tmp_path / "t").exists()


def test_add_token_already_present_is_refused(demo, tmp_path):
    with pytest.raises(LlamaforgeError, match="already a piece") as e:
        merge_tokenizers(demo / "sp/base.model", demo / "sp/chinese.model", tmp_path / "t", add_tokens=["</s>"],
                         echo=lambda *a: None)
    assert "Fix:" in str(e.value)
    assert not (tmp_path / "t").exists()


def test_extra_that_adds_nothing_warns_and_equals_the_base(demo, tmp_path):
    lines = []
    merge_tokenizers(demo / "sp/base.model", demo / "sp/base.model", tmp_path / "t", echo=lines.append)
    assert any("WARNING" in line and "adds no new piece" in line for line in lines)
    assert (tmp_path / "t/tokenizer.model").read_bytes() == (demo / "sp/base.model").read_bytes()
    assert len(load_hf_tokenizer(tmp_path / "t")) == len(load_proto(demo / "sp/base.model").pieces)


def test_a_failed_merge_keeps_the_previous_output(demo, tmp_path):
    out = tmp_path / "t"
    merge_tokenizers(demo / "sp/base.model", demo / "sp/chinese.model", out, echo=lambda *a: None)
    before = (out / "tokenizer.model").read_bytes()
    with pytest.raises(LlamaforgeError):
        merge_tokenizers(demo / "sp/base.model", demo / "sp/chinese.model", out, add_tokens=["<s>"],
                         echo=lambda *a: None)
    assert (out / "tokenizer.model").read_bytes() == before


# --- exact against SentencePiece (llama.cpp's llama-spm test strings and a mixed set) ---------

MIXED = [
    "1234567890", "33333", "2023年10月1日", "3.14159265", "0000", "1 2 3", "９９", "a  b", "   x", "x   ", "\t\n",
    "\n\n\n", " ", "  ", "", "白日依山尽", "中文English混合123", "😀👍🏽 emoji 🇨🇳", "Hello, world!", " leading space",
    "trailing space ", "新\n行", "tabs\tand\tnewlines\n", "上海自来水来自海上", "ÀÉÎõü", "Ωmega ∑ ∫", "日本語テキスト",
    "한국어", "مرحبا", "  多个  空格  ", "11111111111111111111", "北京2008奥运会", "C++ / Python3.11 code()",
    "www.example.com/path?q=1", "<html> tags </html>", "    def f(x):\n        return x * 2\n",
]


@pytest.mark.parametrize("which", ["llama", "alpaca"])
def test_autotokenizer_encodes_exactly_as_sentencepiece(which, chinese_llama, chinese_alpaca):
    """AutoTokenizer on the merged 49953/49954 folders encodes llama.cpp's llama-spm test strings
    and a mixed Chinese/English/digits/emoji set exactly as sentencepiece on tokenizer.model (BOS
    first), and llamaforge's loaded tokenizer decodes them back as sentencepiece does."""
    from families import vocab_tests
    from transformers import AutoTokenizer

    out = (chinese_llama if which == "llama" else chinese_alpaca)[0]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(out)
    ours = load_hf_tokenizer(out)
    texts = [t for t, _ in vocab_tests("llama-spm")] + MIXED
    assert len(texts) > 80
    wrong = [t for t in texts if tok(t).input_ids != [1] + sp.encode(t)]
    assert wrong == []
    assert [ours.decode(sp.encode(t), skip_special_tokens=True) for t in texts] == [sp.decode(sp.encode(t)) for t in texts]
    assert len(tok) == sp.get_piece_size() == (49953 if which == "llama" else 49954)
    # the digit runs a rank-based BPE gets wrong
    assert tok("1234567890").input_ids == [1] + sp.encode("1234567890")


def test_llama_tokenizer_matches_llama_cpp_test_vectors(fixtures):
    """SentencePiece on LLaMA's own tokenizer.model gives llama.cpp's llama-spm ids (the reference the
    GGUF vocabulary is checked against)."""
    from families import vocab_tests

    sp = spm.SentencePieceProcessor(model_file=str(fixtures / "tokenizers/llama/tokenizer.model"))
    cases = vocab_tests("llama-spm")
    assert len(cases) > 40
    assert [sp.encode(t) for t, _ in cases] == [ids for _, ids in cases]


def test_the_package_re_exports_every_name_imported_from_it():
    """llamaforge.tokenizer is a package of one concern a module; every name the checkout imports from
    it (deferred imports inside functions included) stays importable from the package itself."""
    import ast
    from pathlib import Path

    import llamaforge.tokenizer as package

    root = Path(__file__).resolve().parents[1]
    names = set()
    for folder in ("src", "scripts", "tests", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            if "tokenizer" in path.relative_to(root / folder).parts[:-1]:
                continue  # the package's own modules
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (
                        node.module == "llamaforge.tokenizer" or (node.level == 1 and node.module == "tokenizer")):
                    names |= {a.name for a in node.names}
    assert {"load_proto", "merge_tokenizers", "_pb2", "_tiktoken_ranks"} <= names
    assert sorted(n for n in names if not hasattr(package, n)) == []
