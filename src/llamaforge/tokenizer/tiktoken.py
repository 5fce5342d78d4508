"""Byte-level BPE and Meta's Llama-3 tokenizer.model (tiktoken: "base64(token bytes) rank" lines), both ways:
tokenizer.json -> tokenizer.model for the Meta export, tokenizer.model -> tokenizer.json for the import."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlamaforgeError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, by which byte-level BPE vocabularies spell bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_model(tokenizer_json: Path) -> bytes:
    """Meta's Llama-3 tokenizer.model from a byte-level BPE tokenizer.json: one "base64(token bytes)
    rank" line per BPE token, by id (its special tokens live in Meta's code, not in the file)."""
    import base64

    from ..files.reading import read_json

    data = read_json(tokenizer_json, "tokenizer.json")
    vocab = data["model"]["vocab"]
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token in special:
            continue
        try:
            raw = bytes(decode[c] for c in token)
        except KeyError:
            raise LlamaforgeError(f"token {token!r} is not a byte-level BPE token", tokenizer_json,
                                  "export a model with a byte-level BPE tokenizer (Llama-3's)") from None
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    return "".join(lines).encode()


# ---- Meta's Llama-3 tokenizer.model (tiktoken) -> tokenizer.json --------------------------------

# Meta's Llama-3.1/3.2 special tokens, after the 128000 BPE ranks (llama-models' tokenizer.py)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 11 + 2)]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_tiktoken_model(path: Path) -> bool:
    """Meta's Llama-3 tokenizer.model: text lines "base64 rank", not a SentencePiece protobuf."""
    import re

    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0]
    # saved by an editor: a UTF-8 byte order mark, CRLF line ends (read alike by _tiktoken_ranks)
    return bool(re.fullmatch(rb"(\xef\xbb\xbf)?[A-Za-z0-9+/=]+ \d+\r?", first))


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    import base64
    import binascii

    ranks = {}
    try:
        data = path.read_bytes()
        data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        for n, line in enumerate(data.splitlines()):  # noqa: B007 (n names the bad line)
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        raise LlamaforgeError(f"line {n + 1} is not 'base64 rank'", path,
                              "use the tokenizer.model of Meta's Llama-3 release") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamaforgeError("the ranks are not 0 .. N-1", path, "use the tokenizer.model of Meta's Llama-3 release")
    return ranks


def _merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of a tiktoken rank table, as Meta's Llama-3 tokenizer.json lists them (transformers'
    TikTokenConverter): every split of a token into two tokens, by the token's rank, then by the
    halves' ranks."""
    merges = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return [(a, b) for a, b, _ in merges]


def llama3_tokenizer_json(path: Path, rows: int) -> dict:
    """A Hugging Face tokenizer.json for Meta's Llama-3 tokenizer.model: its ranks as a byte-level BPE
    (merges recovered from the ranks, ignore_merges as Meta's tokenizer.json has it), Llama-3's split
    pattern, the special tokens of llama-models after the ranks, BOS put in front."""
    ranks = _tiktoken_ranks(path)
    n = len(ranks)
    if n + len(LLAMA3_SPECIAL_TOKENS) != rows:
        raise LlamaforgeError(
            f"tokenizer.model has {n} ranks + {len(LLAMA3_SPECIAL_TOKENS)} special tokens, but the embeddings have "
            f"{rows} rows", path, "use the tokenizer.model released with these weights")
    spell = _bytes_to_unicode()
    text = {tok: "".join(spell[b] for b in tok) for tok in ranks}
    vocab = {text[tok]: r for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [[text[a], text[b]] for a, b in _merges_of(ranks)]
    added = [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)]
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def write_llama3_tokenizer(tj: dict, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json (from llama3_tokenizer_json) + tokenizer_config.json for a Llama-3 import."""
    out = Path(out_dir)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
           "model_input_names": ["input_ids", "attention_mask"], "model_max_length": int(model_max_length)}
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
