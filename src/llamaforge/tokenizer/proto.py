"""The SentencePiece model proto: parsing a `tokenizer.model` (`ModelProto`), its piece types, and the
special (unk/bos/eos/pad) ids of a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LlamaforgeError
from ..files.reading import require_file

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:  # very old sentencepiece wheels
        from transformers.utils import sentencepiece_model_pb2_new as pb2  # type: ignore
    return pb2


def load_proto(path: str | os.PathLike, what: str = "SentencePiece model"):
    """Parse a SentencePiece `ModelProto`, with a clear error when it is not one."""
    path = require_file(path, what)
    data = path.read_bytes()
    proto = _pb2().ModelProto()
    fix = "point to a SentencePiece model file (tokenizer.model), not a tokenizer.json, vocab or weights file"
    try:
        proto.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise LlamaforgeError(f"not a SentencePiece model ({type(e).__name__})", path, fix) from None
    if len(proto.pieces) == 0 or not proto.HasField("trainer_spec"):
        raise LlamaforgeError("not a SentencePiece model (no pieces)", path, fix)
    return proto


def _special_ids(proto) -> dict[str, int]:
    ts = proto.trainer_spec
    out = {}
    for name, idx in (("unk", ts.unk_id), ("bos", ts.bos_id), ("eos", ts.eos_id), ("pad", ts.pad_id)):
        if 0 <= idx < len(proto.pieces):
            out[name] = idx
    return out


def special_ids(proto, folder: str | os.PathLike | None = None) -> dict[str, int]:
    """unk/bos/eos/pad ids of a tokenizer: the SentencePiece trainer spec, overridden by the
    folder's special_tokens_map.json where it names pieces of the model, and a `[PAD]`/`<pad>`
    piece (Chinese-Alpaca's) as pad when nothing else names one."""
    ids = _special_ids(proto)
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    stm = Path(folder) / "special_tokens_map.json" if folder is not None else None
    if stm is not None and stm.is_file():
        from ..files.reading import read_json

        data = read_json(stm, "special_tokens_map.json")
        if not isinstance(data, dict):
            raise LlamaforgeError("special_tokens_map.json is not a JSON object", stm,
                                  "restore it from the tokenizer's release")
        for key in ("unk", "bos", "eos", "pad"):
            tok = data.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok in index:
                ids[key] = index[tok]
    if "pad" not in ids:
        pad = next((i for i, p in enumerate(proto.pieces) if p.piece in ("[PAD]", "<pad>") and i not in ids.values()),
                   None)
        if pad is not None:
            ids["pad"] = pad
    return ids
