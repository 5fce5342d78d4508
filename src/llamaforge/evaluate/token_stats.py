"""Tokenizer statistics: characters per token (and tokens per character) of the base and the merged
tokenizer on a text, overall and split into Chinese and other lines."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Sequence

from ..files.atomic import write_json
from ..files.reading import require_dir, require_file
from .common import TOKENIZER_STATS, _eval_text, _guard


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and unicodedata.category(ch).startswith("L")


def _encoder(path: str | os.PathLike):
    """(encode function, vocabulary size) for a tokenizer folder or a SentencePiece model file."""
    p = Path(path)
    from ..tokenizer import HF_FILES

    # Hugging Face files beside tokenizer.model: load it as inference does; tokenizer.model alone
    # (a Meta folder) or a bare model file: SentencePiece
    if p.is_dir() and any((p / f).is_file() for f in HF_FILES if f != "tokenizer.model"):
        from ..generate import load_tokenizer

        tok = load_tokenizer(p)
        return (lambda s: tok(s, add_special_tokens=False).input_ids), len(tok)
    from ..tokenizer import load_proto, tokenizer_folder_model

    model = tokenizer_folder_model(require_file(p, "tokenizer") if p.is_file() else require_dir(p, "tokenizer folder"))
    import sentencepiece as spm

    proto = load_proto(model, "tokenizer.model")  # the clear error for a file that is no SentencePiece model
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode, sp.get_piece_size()


def _counts(encode, lines: Sequence[str]) -> dict:
    chars = sum(len(s) for s in lines)
    tokens = sum(len(encode(s)) for s in lines)
    return {"tokens": tokens, "chars_per_token": chars / tokens if tokens else 0.0,
            "tokens_per_char": tokens / chars if chars else 0.0}


def tokenizer_stats(tokenizer: str | os.PathLike, base_tokenizer: str | os.PathLike,
                    text_file: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                    echo=print) -> dict:
    """Characters per token before (base) and after (merged) the vocabulary merge, line by line
    (default text: the bundled sample)."""
    _guard(output, TOKENIZER_STATS, [("tokenizer folder", tokenizer), ("base tokenizer", base_tokenizer),
                                     ("text file", text_file)])
    text, text_name = _eval_text(text_file, "tokenizer-stats text")
    lines = [s for s in text.splitlines() if s.strip()]
    enc_m, vocab_m = _encoder(tokenizer)
    enc_b, vocab_b = _encoder(base_tokenizer)
    groups = {"chinese": [], "other": []}
    for s in lines:
        letters = [c for c in s if not c.isspace()]
        cjk = sum(_is_cjk(c) for c in letters)
        groups["chinese" if letters and cjk / len(letters) >= 0.3 else "other"].append(s)

    def block(ls):
        return {"lines": len(ls), "characters": sum(len(s) for s in ls),
                "base": _counts(enc_b, ls), "merged": _counts(enc_m, ls)}

    overall = block(lines)
    result = {
        "llamaforge": TOKENIZER_STATS,
        "tokenizer": os.fspath(tokenizer), "base_tokenizer": os.fspath(base_tokenizer), "text": text_name,
        "vocab": {"base": vocab_b, "merged": vocab_m},
        **overall,
        "token_reduction": 1 - overall["merged"]["tokens"] / overall["base"]["tokens"] if overall["base"]["tokens"] else 0.0,
        "by_script": {k: block(v) for k, v in groups.items() if v},
    }
    echo(f"characters per token: base {overall['base']['chars_per_token']:.3f} ({vocab_b} tokens), merged "
         f"{overall['merged']['chars_per_token']:.3f} ({vocab_m} tokens); {result['token_reduction']:.1%} fewer tokens")
    for k, b in result["by_script"].items():
        echo(f"  {k} ({b['lines']} lines): base {b['base']['chars_per_token']:.3f}, merged {b['merged']['chars_per_token']:.3f}")
    if output:
        write_json(output, result)
    return result
