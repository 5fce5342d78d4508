"""Vocabulary extension of byte-level BPE bases (issue 22): words added to a tokenizer.json base
(Llama-3's, Qwen2's: llama.cpp's real vocabularies) as normal tokens change how llama.cpp's check
text encodes, so its converter no longer knows the pre-tokenizer (llama.cpp#8649). The GGUF export
names the base's own, found with the added tokens set aside, and llama.cpp then tokenizes text with
the added words exactly as Hugging Face does; a base it cannot name is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
from families import convert_hf_to_gguf, family_tokenizer, llama_cpp_model, make_family_model, read_gguf, vocab_tests
from helpers import run_script

# two of the words occur in llama.cpp's check text ("?我想在apple工作1314151天～")
WORDS = ["工作", "我想", "中文", "你好世界", "苹果手机"]
BASES = {"llama3": ("llama-bpe", "llama-bpe"), "qwen2": ("qwen2", "qwen2")}  # family: (vocabulary, pre name)
TEXTS = ["我想在apple工作1314151天～", "你好世界，我想用中文工作。", " 工作 工作工作 我想想", "苹果手机和苹果",
         "Hello 你好世界 world 中文!", "\n工作\n\n  中文  "]


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """{family: (extended tokenizer folder, GGUF of a model with it)}."""
    from llamaforge.export import export_gguf
    from llamaforge.export.gguf_meta import pre_tokenizer_table

    cache = {}

    def build(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"ext-{name}")
            base, rows = family_tokenizer(name, root / "base")
            tok = root / "tok"
            args = [a for w in WORDS for a in ("--add-token", w)]
            proc = run_script("merge_tokenizers.py", "--base", base, *args, "--add-token", "<|my_pad|>",
                              "--output", tok, check=True)
            assert "(normal)" in proc.stdout and "(special)" in proc.stdout
            n = json.loads((tok / "merge_report.json").read_text())["merged_tokens"]
            model = make_family_model(root / "model", name, tok, max(rows, n))
            out = root / "m.gguf"
            export_gguf(model, out, "f16", echo=lambda *a: None, modelfile=None)
            cache[name] = (tok, base, out)
        return cache[name]

    assert any(w in pre_tokenizer_table()[0] for w in WORDS)
    return build


def split_digits_in_twos(tj: dict) -> None:
    """Another pre-tokenizer than the base's: runs of digits split in twos, not threes."""
    rx = tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    assert "\\p{N}{1,3}" in rx["Regex"]
    rx["Regex"] = rx["Regex"].replace("\\p{N}{1,3}", "\\p{N}{1,2}")


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    """{family: (base tokenizer folder, extended folder)}: WORDS and a marker added by the library."""
    from llamaforge.tokenizer import merge_tokenizers

    cache = {}

    def build(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"tok-{name}")
            base, _ = family_tokenizer(name, root / "base")
            merge_tokenizers(base, None, root / "tok", add_tokens=WORDS + ["<|my_pad|>"], echo=lambda *a: None)
            cache[name] = (base, root / "tok")
        return cache[name]

    return build


@pytest.mark.parametrize("name", sorted(BASES))
def test_pre_tokenizer_of_an_extended_base_is_the_bases(extension, name):
    import hashlib

    from llamaforge.export.gguf_meta import pre_tokenizer, pre_tokenizer_table
    from llamaforge.tokenizer import FastTokenizer

    base, tok = extension(name)
    chktxt, table = pre_tokenizer_table()
    fast, base_fast = FastTokenizer(tok), FastTokenizer(base)
    assert hashlib.sha256(str(fast.encode(chktxt)).encode()).hexdigest() not in table  # llama.cpp#8649
    assert pre_tokenizer(fast, tok) == pre_tokenizer(base_fast, base) == BASES[name][1]
    aside, words = fast.without_added_in(chktxt)
    assert words == ["工作", "我想"] and aside.encode(chktxt) == base_fast.encode(chktxt) != fast.encode(chktxt)
    added = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"][-len(WORDS) - 1:]
    assert [(a["content"], a["special"], a["normalized"]) for a in added] == \
        [(w, False, False) for w in WORDS] + [("<|my_pad|>", True, False)]


def test_an_extended_base_whose_own_pre_tokenizer_is_unknown_is_refused(extension, tmp_path):
    """With the added words set aside, a tokenizer llama.cpp does not know (another digit split) is
    refused in one line, never named by guess."""
    from llamaforge.errors import LlamaforgeError
    from llamaforge.export.gguf_meta import pre_tokenizer
    from llamaforge.tokenizer import FastTokenizer

    tok = tmp_path / "tok"
    shutil.copytree(extension("llama3")[1], tok)
    tj = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))
    split_digits_in_twos(tj)
    (tok / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(LlamaforgeError) as e:
        pre_tokenizer(FastTokenizer(tok), tok / "tokenizer.json")
    msg = str(e.value)
    assert "\n" not in msg and "pre-tokenizer" in msg and "'工作', '我想' set aside" in msg and "Fix:" in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASES))
def test_extended_bpe_base_exports_under_the_bases_pre_tokenizer(extended, name):
    from transformers import AutoTokenizer

    from llamaforge.export.gguf_meta import pre_tokenizer, pre_tokenizer_table
    from llamaforge.tokenizer import FastTokenizer

    tok, base, gguf_path = extended(name)
    vocab, pre = BASES[name]
    chktxt, table = pre_tokenizer_table()
    hf = AutoTokenizer.from_pretrained(tok)
    # the added words do change the check text's encoding: llama.cpp's converter would not know it
    import hashlib

    assert hashlib.sha256(str(hf.encode(chktxt)).encode()).hexdigest() not in table
    assert pre_tokenizer(FastTokenizer(base), base) == pre
    meta, _ = read_gguf(gguf_path)
    assert meta["tokenizer.ggml.pre"] == pre
    tokens = meta["tokenizer.ggml.tokens"]
    types = [t[0] if isinstance(t, list) else t for t in meta["tokenizer.ggml.token_type"]]
    for w in WORDS:  # normal words: user-defined tokens (4), the marker a control token (3)
        i = hf.convert_tokens_to_ids(w)
        assert tokens[i] == w and types[i] == 4
    assert types[hf.convert_tokens_to_ids("<|my_pad|>")] == 3
    # llama.cpp tokenizes text with the added words, and its own test vectors, as Hugging Face does
    llm = llama_cpp_model(gguf_path, vocab_only=True)
    texts = TEXTS + [chktxt] + [t for t, _ in vocab_tests(vocab)]
    got = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    want = [hf.encode(t, add_special_tokens=False) for t in texts]
    assert got == want
    added = {hf.convert_tokens_to_ids(w) for w in WORDS}
    assert all(added & set(ids) for ids in want[: len(TEXTS)])  # every text uses an added word
    assert hf.encode("我想在apple工作", add_special_tokens=False)[0] == hf.convert_tokens_to_ids("我想")
    assert [llm.detokenize(ids).decode("utf-8") for ids in want[: len(TEXTS)]] == [hf.decode(i) for i in want[: len(TEXTS)]]
    assert llm.tokenize(b"Hi", add_bos=True)[0] == hf("Hi").input_ids[0]
    if name == "llama3":  # llama.cpp's own converter refuses this folder (llama.cpp#8649): unknown chkhsh
        with pytest.raises(AssertionError, match="BPE pre-tokenizer was not recognized"):
            convert_hf_to_gguf(gguf_path.parent / "model", gguf_path.with_name("ref.gguf"))


@pytest.mark.slow
def test_an_extended_base_of_unknown_pre_tokenizer_is_refused_in_one_line(extended, tmp_path):
    """Set aside, the added words leave a tokenizer llama.cpp does not know (a changed pre-tokenizer):
    refused, never given a name by guess."""
    tok, _, gguf_path = extended("llama3")
    model = tmp_path / "m"
    shutil.copytree(gguf_path.parent / "model", model)
    tj = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    split_digits_in_twos(tj)
    (model / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    proc = run_script("export_gguf.py", "--model", model, "--output", tmp_path / "x.gguf")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "pre-tokenizer" in lines[0] and "set aside" in lines[0] and "'工作'" in lines[0] and "Fix:" in lines[0]
    assert not (tmp_path / "x.gguf").exists()
