"""Loading a tokenizer folder with transformers (`load_hf_tokenizer`, with sentencepiece's own decode)
and probing it against SentencePiece."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LlamaforgeError
from .folder import check_tokenizer
from .texts import TEST_SENTENCE


def load_hf_tokenizer(folder: str | os.PathLike):
    """AutoTokenizer for a folder, never trusting remote code."""
    from transformers import AutoTokenizer

    check_tokenizer(folder)
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlamaforgeError(f"cannot load the tokenizer: {msg[:200]}", folder,
                              "restore the tokenizer files, or rebuild them with scripts/merge_tokenizers.py") from None
    if hasattr(tok, "sp_model"):
        exact_sentencepiece_decode(tok)
    return tok


def exact_sentencepiece_decode(tok):
    """Decode as sentencepiece does: transformers 5.24's SentencePieceBackend joins the pieces as
    text, so byte-fallback pieces come out as "<0x0A>" and edge spaces are stripped; sentencepiece's
    own decode_pieces turns them back into the bytes and keeps the spaces."""
    import types

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(list(tokens))

    tok.convert_tokens_to_string = types.MethodType(convert_tokens_to_string, tok)
    return tok


def check_hf_tokenizer(folder: str | os.PathLike, samples=(TEST_SENTENCE,)) -> dict:
    """Load `folder` with AutoTokenizer and compare it with SentencePiece; raise when it is broken.

    Guards against the silent failures of transformers 5 (a 3-token tokenizer, a missing BOS).
    Returns the share of sample lines segmented identically.
    """
    import sentencepiece as spm

    folder = Path(folder)
    sp = spm.SentencePieceProcessor(model_file=os.fspath(folder / "tokenizer.model"))
    tok = load_hf_tokenizer(folder)
    n = sp.get_piece_size()
    fix = "rebuild it with scripts/merge_tokenizers.py, which writes tokenizer.json beside tokenizer.model"
    if len(tok) != n:
        raise LlamaforgeError(f"Hugging Face tokenizer has {len(tok)} tokens but tokenizer.model has {n}", folder, fix)
    bos = sp.bos_id()
    same = total = 0
    for line in samples:
        for text in (s for s in line.splitlines() if s.strip()):
            total += 1
            ids = tok(text).input_ids
            if bos >= 0:
                if not ids or ids[0] != bos:
                    raise LlamaforgeError(f"Hugging Face tokenizer does not put BOS id {bos} first", folder, fix)
                ids = ids[1:]
            same += ids == sp.encode(text)
    if bos >= 0 and tok.bos_token_id != bos:
        raise LlamaforgeError(f"bos_token_id is {tok.bos_token_id}, SentencePiece says {bos}", folder, fix)
    if sp.eos_id() >= 0 and tok.eos_token_id != sp.eos_id():
        raise LlamaforgeError(f"eos_token_id is {tok.eos_token_id}, SentencePiece says {sp.eos_id()}", folder, fix)
    if sp.unk_id() >= 0 and tok.unk_token_id != sp.unk_id():
        raise LlamaforgeError(f"unk_token_id is {tok.unk_token_id}, SentencePiece says {sp.unk_id()}", folder, fix)
    return {"lines": total, "identical": same, "agreement": same / total if total else 1.0}


def tokens_per_char(sp, text: str) -> float:
    chars = sum(len(line) for line in text.splitlines())
    toks = sum(len(sp.encode(line)) for line in text.splitlines())
    return toks / chars if chars else 0.0


class FastTokenizer:
    """A tokenizer.json tokenizer as transformers' fast tokenizer presents it (get_vocab,
    get_added_vocab, added_tokens_decoder, encode, decode), from the tokenizers library alone and
    from the bytes already read (fsutil.metadata_bytes): what the GGUF export needs of a byte-level
    BPE tokenizer, without importing transformers or opening the files again. Tokens that
    tokenizer_config.json's added_tokens_decoder declares and tokenizer.json lacks are added, as
    transformers adds them. The folder is one check_tokenizer accepted (the ModelFolder's
    vocab_length ran it)."""

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import AddedToken, Tokenizer

        from ..files.hashing import metadata_bytes
        from ..files.reading import read_json

        folder = Path(folder)
        self._tk = Tokenizer.from_str(metadata_bytes(folder / "tokenizer.json").decode("utf-8"))
        tc = folder / "tokenizer_config.json"
        declared = (read_json(tc, "tokenizer_config.json").get("added_tokens_decoder") or {}) if tc.is_file() else {}
        have = self._tk.get_added_tokens_decoder()
        for tid, data in sorted(declared.items(), key=lambda kv: int(kv[0])):
            if int(tid) in have:
                continue
            tok = AddedToken(data["content"], single_word=bool(data.get("single_word", False)),
                             lstrip=bool(data.get("lstrip", False)), rstrip=bool(data.get("rstrip", False)),
                             normalized=bool(data.get("normalized", not data.get("special", False))),
                             special=bool(data.get("special", False)))
            (self._tk.add_special_tokens if tok.special else self._tk.add_tokens)([tok])
        self.added_tokens_decoder = self._tk.get_added_tokens_decoder()

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def without_added_in(self, text: str) -> tuple["FastTokenizer | None", list[str]]:
        """(this tokenizer without its added tokens, the contents of those that occur in `text`), or
        (None, []) when none occurs: how the base that the added tokens extend (tokenizer.json plus
        add_tokens) encodes `text`. Its model, normalizer, pre-tokenizer and post-processor (which names
        its BOS by id) are this one's, shared; an added token that does not occur in `text` (as written
        or normalized) changes nothing of its encoding, and one that does is set aside."""
        from tokenizers import Tokenizer

        norm = self._tk.normalizer.normalize_str(text) if self._tk.normalizer is not None else text
        found = [t.content for _, t in sorted(self.added_tokens_decoder.items()) if t.content in text or t.content in norm]
        if not found:
            return None, []
        tk = Tokenizer(self._tk.model)
        for part in ("normalizer", "pre_tokenizer", "post_processor"):
            if getattr(self._tk, part) is not None:
                setattr(tk, part, getattr(self._tk, part))
        base = object.__new__(FastTokenizer)
        base._tk, base.added_tokens_decoder = tk, {}
        return base, found
