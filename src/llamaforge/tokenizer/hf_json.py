"""The Hugging Face files of a SentencePiece tokenizer: tokenizer.json, tokenizer_config.json and
special_tokens_map.json beside tokenizer.model.

`tokenizer_config.json` names transformers 5's SentencePiece backend (`SentencePieceBackend`, with
`special_tokens_pattern: bos`), so `AutoTokenizer.from_pretrained(folder)` encodes with sentencepiece
itself: exactly as `tokenizer.model` does. A tokenizers-BPE `tokenizer.json` cannot: when two
overlapping merges have the *same* score (the 17953 appended Chinese pieces all score 0)
SentencePiece takes the leftmost and a rank-based BPE the lower rank, which differs on runs of digits
and whitespace. We still write one (merges ordered by score, SentencePiece's normalisation) for tools
that read tokenizer.json alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LlamaforgeError
from .proto import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, _special_ids


def pad_token_of(add_tokens) -> str | None:
    """The added token that serves as padding: the first whose name says 'pad'."""
    for t in add_tokens:
        if "pad" in t.lower():
            return t
    return None


def build_tokenizer_json(proto, extra_special: list[str] = ()) -> dict:
    """A `tokenizers` BPE definition that segments text as SentencePiece does (see module doc)."""
    if proto.trainer_spec.model_type != 2:  # BPE
        raise LlamaforgeError(
            "only BPE SentencePiece models (as LLaMA's) can be written as a fast tokenizer; this one is "
            f"model_type={proto.trainer_spec.model_type}",
            None,
            "use a LLaMA-style BPE base model",
        )
    pieces = proto.pieces
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p.piece, i)
    normal = {p.piece for p in pieces if p.type == NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL or p.piece in extra_special:
            continue
        s = p.piece
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [[left, right] for *_, left, right in ranked]

    specials = _special_ids(proto)
    added = []
    for i, p in enumerate(pieces):
        special = p.type in (CONTROL, UNKNOWN) or p.piece in extra_special
        if special or p.type == USER_DEFINED:
            added.append({"id": i, "content": p.piece, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": special})
    bos = pieces[specials["bos"]].piece if "bos" in specials else None
    if bos is not None:
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [specials["bos"]], "tokens": [bos]}},
        }
    else:
        post = None
    ns = proto.normalizer_spec
    normalizers = []
    if ns.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if ns.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = pieces[specials["unk"]].piece if "unk" in specials else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": bool(proto.trainer_spec.byte_fallback),
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def write_hf_tokenizer(proto, out_dir: str | os.PathLike, add_tokens=(), model_bytes: bytes | None = None,
                       model_max_length: int | None = None) -> None:
    """Write tokenizer.model and the Hugging Face files for `proto` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_bytes if model_bytes is not None else proto.SerializeToString())
    pad = pad_token_of(add_tokens)
    extra_special = list(add_tokens)
    tj = build_tokenizer_json(proto, extra_special)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    specials = _special_ids(proto)
    names = {k: proto.pieces[v].piece for k, v in specials.items()}
    if pad is not None:
        names["pad"] = pad
    stm = {f"{k}_token": names[k] for k in ("bos", "eos", "unk", "pad") if k in names}
    others = [t for t in add_tokens if t != pad]
    if others:
        stm["additional_special_tokens"] = others
    cfg = {
        # transformers 5's SentencePiece backend: AutoTokenizer encodes with sentencepiece itself, so
        # exactly as tokenizer.model does (a tokenizers-BPE tokenizer.json cannot express its
        # leftmost tie-break among equal scores, see the module doc); special_tokens_pattern "bos"
        # puts BOS first as LLaMA's tokenizer does. tokenizer.json stays for tools that read it alone.
        "tokenizer_class": "SentencePieceBackend",
        "special_tokens_pattern": "bos" if "bos" in names else "none",
        "add_bos_token": "bos" in names,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "padding_side": "left",
        "sp_model_kwargs": {},
        **stm,
    }
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(stm, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
