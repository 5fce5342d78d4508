"""Merging tokenizers: an extra SentencePiece model (and added tokens) into a SentencePiece base, or added
tokens into a tokenizer.json tokenizer (Llama-3, Qwen2, ...).

The merge is the one of Chinese-LLaMA-Alpaca's `merge_tokenizers.py`: parse both `ModelProto`s,
append every piece of the extra model that the base lacks, in order, with score 0, then append
each `--add-token` (e.g. `[PAD]`) the same way, and serialize. For the real LLaMA and Chinese
models this reproduces the published `tokenizer.model` files byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlamaforgeError
from ..files.atomic import atomic_dir
from ..files.guard import json_or_none, guard_output, register_output_kind
from .folder import tokenizer_files, tokenizer_length
from .hf_json import pad_token_of, write_hf_tokenizer
from .load import check_hf_tokenizer, load_hf_tokenizer, tokens_per_char
from .proto import _pb2, load_proto
from .texts import TEST_SENTENCE, bundled_text

log = logging.getLogger("llamaforge.tokenizer")  # the name the log lines have always carried


def _is_own_tokenizer(folder: Path) -> bool:
    """A merged tokenizer folder is llamaforge's by its merge_report.json {"llamaforge":
    "merge_tokenizers", ...}, or that of an earlier llamaforge (no "llamaforge" key, its counts)."""
    data = json_or_none(folder / "merge_report.json")
    return isinstance(data, dict) and (data.get("llamaforge") == "merge_tokenizers" or {
        "base_pieces", "extra_pieces", "merged_pieces", "added_pieces"} <= data.keys())


register_output_kind("tokenizer", "merged tokenizer folder", _is_own_tokenizer, folder=True)


@dataclass
class MergeResult:
    base_pieces: int
    extra_pieces: int
    added: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    merged_pieces: int = 0


def merge_protos(base, extra, add_tokens=(), base_path="base", extra_path="extra"):
    """Return (merged proto, MergeResult). `base` is not modified."""
    pb2 = _pb2()
    merged = pb2.ModelProto()
    merged.CopyFrom(base)
    present = {p.piece for p in merged.pieces}
    result = MergeResult(base_pieces=len(base.pieces), extra_pieces=len(extra.pieces))
    for p in extra.pieces:
        if p.piece not in present:
            new = pb2.ModelProto.SentencePiece()
            new.piece = p.piece
            new.score = 0
            merged.pieces.append(new)
            present.add(p.piece)
            result.added.append(p.piece)
    for i, tok in enumerate(add_tokens):
        if not tok:
            raise LlamaforgeError("--add-token is empty", None, "give the token text, e.g. --add-token '[PAD]'")
        if tok in add_tokens[:i]:
            raise LlamaforgeError(f"--add-token {tok!r} is given twice", None,
                                  "give each added token once (add_tokens in config.yaml, or --add-token)")
        if tok in present:
            raise LlamaforgeError(
                f"--add-token {tok!r} is already a piece of the merged vocabulary",
                base_path if tok in {p.piece for p in base.pieces} else extra_path,
                f"drop --add-token {tok!r} (or add_tokens in config.yaml); it would be a duplicate",
            )
        new = pb2.ModelProto.SentencePiece()
        new.piece = tok
        new.score = 0
        merged.pieces.append(new)
        present.add(tok)
        result.added_tokens.append(tok)
    result.merged_pieces = len(merged.pieces)
    return merged, result


def merge_tokenizers(base: str | os.PathLike, extra: str | os.PathLike | None, output: str | os.PathLike,
                     add_tokens=(), echo=print) -> dict:
    """Merge `extra` into `base`, write `output/` atomically, print the original script's report.

    Returns a summary dict (also written as `output/merge_report.json`).
    """
    import sentencepiece as spm

    if Path(base).is_dir() or Path(base).name == "tokenizer.json":
        if extra is not None:
            raise LlamaforgeError("an extra SentencePiece model cannot be merged into a tokenizer.json tokenizer", extra,
                                  "drop extra: (--extra) and list the new tokens under add_tokens: (--add-token)")
        return add_tokens_json(base, output, add_tokens, echo)
    if extra is None and not add_tokens:
        raise LlamaforgeError("nothing to merge: no extra SentencePiece model and no token to add", base,
                              "set extra: (--extra) and/or add_tokens: (--add-token) in config.yaml")
    guard_output(output, "tokenizer", [("base SentencePiece model", base), ("extra SentencePiece model", extra)])
    base_path = Path(base)
    base_proto = load_proto(base_path, "base SentencePiece model")
    if extra is None:  # only tokens added (e.g. [PAD] to LLaMA's own model)
        extra_path, extra_proto = None, _pb2().ModelProto()
    else:
        extra_path = Path(extra)
        extra_proto = load_proto(extra_path, "extra SentencePiece model")
    merged, res = merge_protos(base_proto, extra_proto, list(add_tokens), base_path, extra_path)
    base_sp = spm.SentencePieceProcessor(model_proto=base_path.read_bytes())

    echo(f"base: {base_path} ({res.base_pieces} pieces), extra: {extra_path} ({res.extra_pieces} pieces)")
    echo(f"Before: {res.base_pieces}")
    if extra_path is None:
        pass  # tokens only
    elif not res.added:
        log.warning("%s adds no piece that %s lacks; the output equals the base", extra_path, base_path)
        echo(f"WARNING: {extra_path} adds no new piece; the merged vocabulary equals the base")
    else:
        shown = " ".join(res.added[:20]) + (" ..." if len(res.added) > 20 else "")
        echo(f"Added {len(res.added)} pieces from the extra model: {shown}")
    for t in res.added_tokens:
        echo(f"Added token {t!r} with id {res.merged_pieces - len(res.added_tokens) + res.added_tokens.index(t)}")
    echo(f"New model pieces: {res.merged_pieces}")

    unchanged = not res.added and not res.added_tokens
    model_bytes = base_path.read_bytes() if unchanged else merged.SerializeToString()
    merged_sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    chinese = bundled_text("chinese.txt")
    summary = {
        "llamaforge": "merge_tokenizers",
        "base": os.fspath(base_path),
        "extra": None if extra_path is None else os.fspath(extra_path),
        "base_pieces": res.base_pieces,
        "extra_pieces": res.extra_pieces,
        "added_pieces": len(res.added),
        "added_tokens": res.added_tokens,
        "merged_pieces": res.merged_pieces,
        "test_sentence_tokens": {"base": len(base_sp.encode(TEST_SENTENCE)),
                                 "merged": len(merged_sp.encode(TEST_SENTENCE))},
        "chinese_tokens_per_char": {"base": round(tokens_per_char(base_sp, chinese), 4),
                                    "merged": round(tokens_per_char(merged_sp, chinese), 4)},
    }
    echo(f"Test text:\n{TEST_SENTENCE}")
    echo(f"Tokenized by the base tokenizer ({summary['test_sentence_tokens']['base']} pieces): "
         f"{base_sp.encode(TEST_SENTENCE, out_type=str)}")
    echo(f"Tokenized by the merged tokenizer ({summary['test_sentence_tokens']['merged']} pieces): "
         f"{merged_sp.encode(TEST_SENTENCE, out_type=str)}")
    cpt = summary["chinese_tokens_per_char"]
    echo(f"Tokens per character on the bundled Chinese sample: before {cpt['base']:.3f}, after {cpt['merged']:.3f}")

    with atomic_dir(output) as tmp:
        write_hf_tokenizer(merged, tmp, res.added_tokens, model_bytes=model_bytes)
        check = check_hf_tokenizer(tmp, samples=(TEST_SENTENCE, chinese, bundled_text("english.txt")))
        summary["hf_agreement"] = check
        echo(f"Hugging Face tokenizer: {res.merged_pieces} tokens, BOS first, identical to SentencePiece on "
             f"{check['identical']}/{check['lines']} sample lines")
        with open(tmp / "merge_report.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return summary


# ---------------------------------------------------------------------------------------------
# tokenizer.json tokenizers (Llama-3, Qwen2, ...): tokens added, everything else byte for byte


def is_marker(token: str) -> bool:
    """An added token that marks (a pad, a role, a tag: [PAD], <|im_start|>, <think>) rather than a
    word of the text (工作): added as a special token; a word is added as a normal one."""
    return len(token) > 2 and (token[0], token[-1]) in (("<", ">"), ("[", "]"))


def _added_token(content: str, id_: int) -> dict:
    """A tokenizer.json added token: special for a marker; a word is a normal one, matched in the raw
    text (normalized false) as llama.cpp matches a user-defined token, before the pre-tokenizer."""
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": is_marker(content)}


def add_tokens_json(base: str | os.PathLike, output: str | os.PathLike, add_tokens=(), echo=print) -> dict:
    """A tokenizer.json tokenizer folder with `add_tokens` appended as added tokens (ids from the
    tokenizer's length on; markers special, words normal: `is_marker`), written atomically to
    `output`. The other files are copied
    byte for byte; tokenizer_config.json gains the tokens in added_tokens_decoder (and the first
    token named like "pad" as pad_token when it has none)."""
    from ..files.reading import read_json

    base = Path(base)
    folder = base.parent if base.is_file() else base
    guard_output(output, "tokenizer", [("base tokenizer", folder)])
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise LlamaforgeError("no tokenizer.json in the base tokenizer folder", folder,
                              "point base: at a tokenizer.json tokenizer folder, or at a SentencePiece tokenizer.model")
    n = tokenizer_length(folder)
    tj = read_json(tj_path, "tokenizer.json")
    vocab = (tj.get("model") or {}).get("vocab")
    present = set(vocab) if isinstance(vocab, dict) else {p[0] for p in vocab or [] if isinstance(p, list) and p}
    present |= {t.get("content") for t in tj.get("added_tokens", []) if isinstance(t, dict)}
    seen: set[str] = set()
    for tok in add_tokens:
        if tok in present or tok in seen:
            raise LlamaforgeError(f"--add-token {tok!r} is already a token of the tokenizer", tj_path,
                                  f"drop --add-token {tok!r} (or add_tokens in config.yaml); it would be a duplicate")
        seen.add(tok)
    added = [_added_token(t, n + i) for i, t in enumerate(add_tokens)]
    tj.setdefault("added_tokens", []).extend(added)
    cfg_path = folder / "tokenizer_config.json"
    cfg = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for a in added:
        decoder[str(a["id"])] = {k: v for k, v in a.items() if k != "id"}
    pad = pad_token_of(add_tokens)
    if pad and not cfg.get("pad_token"):
        cfg["pad_token"] = pad
    for a in added:
        echo(f"Added token {a['content']!r} with id {a['id']} ({'special' if a['special'] else 'normal'})")
    echo(f"New vocabulary: {n} -> {n + len(added)} tokens")
    summary = {"llamaforge": "merge_tokenizers", "base": os.fspath(folder), "base_tokens": n,
               "added_tokens": list(add_tokens), "merged_tokens": n + len(added)}
    with atomic_dir(output) as tmp:
        for f in tokenizer_files(folder):
            if f.name not in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(f, tmp / f.name)
        for name, data in (("tokenizer.json", tj), ("tokenizer_config.json", cfg)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
                f.write("\n")
        tok = load_hf_tokenizer(tmp)
        if len(tok) != n + len(added) or any(tok.convert_tokens_to_ids(t) != n + i for i, t in enumerate(add_tokens)):
            raise LlamaforgeError(f"the extended tokenizer loads with {len(tok)} tokens, not {n + len(added)}",
                                  tj_path, "check the tokenizer's added_tokens for gaps in the ids")
        with open(tmp / "merge_report.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return summary
