"""A GGUF against the model it claims to be, without torch or transformers: --from-f16's F16 must be
llamaforge's F16 of this very model (its `.sha256`, every metadata key an F16 export writes, the
tensors' names, shapes and types, the vocabulary token by token), checked before llama.cpp reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LlamaforgeError
from ..model import (
    OUTPUT,
    ModelFolder,
    TokenizerKind,
)
from .gguf_meta import (
    GGUF_OWN_KEY,
    extra_tensor_shapes,
    gguf_metadata,
    gguf_qtype,
)

if TYPE_CHECKING:  # torch, the weight files and the stream only where tensors are read or written

    pass


def check_f16(gguf, path: Path, m: ModelFolder) -> dict:
    """--from-f16 must be the F16 GGUF llamaforge wrote of this very model: a regular file whose
    `.sha256` beside it holds its hash, with the ownership key, file type F16, the model's
    architecture, exactly the tensors (names and shapes) an export of the model writes, and its
    vocabulary, token by token. Checked before llama.cpp sees it (which would quantize any of them,
    or crash). Returns its size, tensor count and chat template."""
    from ..files.hashing import sha256_cached
    from ..files.reading import require_regular_file
    from .quantize import gguf_file_type, gguf_string

    again = f"export it again: scripts/export_gguf.py --model {m.folder} --outtype f16 --output {path}"
    require_regular_file(path, "the F16 GGUF", "build it first (exports/{model}/{model}-f16.gguf)")
    reader = open_gguf(gguf, path, "export the model to GGUF f16 again")
    if GGUF_OWN_KEY not in reader.fields or gguf_file_type(reader) != int(gguf.LlamaFileType.MOSTLY_F16):
        raise LlamaforgeError("not an F16 GGUF that llamaforge wrote", path,
                              "give the F16 export of this model (scripts/export_gguf.py --outtype f16)")
    check_gguf_of(gguf, reader, path, m, again)
    template = gguf_string(reader, "tokenizer.chat_template", path)  # a string of UTF-8, before it is compared
    _check_f16_metadata(gguf, reader, path, m, again)
    # last, as the costliest: every byte as written (tensor data swapped or damaged since)
    sidecar = path.with_name(path.name + ".sha256")
    try:
        line = sidecar.read_text(encoding="utf-8").split("\n")[0]
    except (OSError, UnicodeDecodeError):
        raise LlamaforgeError(f"the F16 GGUF has no readable {sidecar.name} beside it, by which its bytes are checked",
                              path, again) from None
    want = line.split()[0] if line.split() else ""
    got = sha256_cached(path)
    if got != want:
        raise LlamaforgeError(f"the F16 GGUF does not match its {sidecar.name} (sha256 {got}, expected "
                              f"{want or 'none'}): it was changed or damaged after it was written", path, again)
    return {"bytes": path.stat().st_size, "tensors": len(reader.tensors),
            "chat_template": template}


def _check_f16_metadata(gguf, reader, path: Path, m: ModelFolder, again: str) -> None:
    """Every key of the F16 GGUF as an F16 export of the model writes it, and every tensor of the type
    it writes: llama.cpp's quantizer copies the keys as they are, so an F16 whose hyperparameters
    (head counts, rope base, norm epsilon, context length), special tokens, scores or chat template were
    changed would give a quantized model that is not the model's. general.name may be any (--name),
    llamaforge.version that of the llamaforge which wrote it."""
    from .quantize import gguf_string

    writer = gguf.GGUFWriter(path=None, arch=m.family.gguf_arch)
    gguf_metadata(gguf, writer, m, "f16", gguf_string(reader, "general.name", path) or m.folder.name)
    want = writer.kv_data[0]
    have = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for key in sorted(set(want) | set(have)):
        if key in (GGUF_OWN_KEY, "general.name"):
            continue
        if key not in have:
            raise LlamaforgeError(f"the F16 GGUF has no key {key}, which an F16 export of the model writes", path, again)
        if key not in want:
            raise LlamaforgeError(f"the F16 GGUF has the key {key}, which an F16 export of the model does not write",
                                  path, again)
        if not _same_kv(gguf, want[key], have[key], ordered=key != gguf.Keys.Tokenizer.CHAT_TEMPLATES):
            raise LlamaforgeError(f"the F16 GGUF's {key} differs from the model's ({_kv_text(have[key])}): it was "
                                  "changed after it was written, or is another model's", path, again)
    types = {n: gguf.GGMLQuantizationType.F32 for n in extra_tensor_shapes(m)}
    types.update({t.gguf: gguf_qtype(gguf, t, m.dims.shape_of(t), "f16") for t in m.family.hf_order(m.dims.n_layers)})
    for t in reader.tensors:
        if t.name in types and int(t.tensor_type) != int(types[t.name]):
            raise LlamaforgeError(f"the F16 GGUF's {t.name} is of type {t.tensor_type.name}, an F16 export's "
                                  f"{types[t.name].name}", path, again)


def _same_kv(gguf, want, field, ordered: bool = True) -> bool:
    """Whether a GGUF reader's `field` holds the writer's value `want` (a GGUFValue), byte for byte."""
    import numpy as np

    T = gguf.GGUFValueType

    def raw(v) -> bytes:
        return v.encode("utf-8") if isinstance(v, str) else bytes(v)

    if not field.types or field.types[0] != want.type:
        return False
    if want.type == T.STRING:
        return bytes(field.parts[-1]) == raw(want.value)
    if want.type != T.ARRAY:
        got = field.parts[-1]
        return bool(np.array_equal(got, np.asarray([want.value], dtype=got.dtype)))
    # gguf-py leaves sub_type None where it infers the items' type when writing
    if (want.sub_type is not None and field.types[-1] != want.sub_type) or len(field.data) != len(want.value):
        return False
    if field.types[-1] == T.STRING:
        if not all(isinstance(v, (str, bytes, bytearray)) for v in want.value):
            return False
        got_s, want_s = [bytes(field.parts[i]) for i in field.data], [raw(v) for v in want.value]
        return got_s == want_s if ordered else sorted(got_s) == sorted(want_s)
    if not field.data:
        return True
    got = np.concatenate([field.parts[i] for i in field.data])
    return bool(np.array_equal(got, np.asarray(want.value, dtype=got.dtype)))


def _kv_text(field) -> str:
    """A short text of a GGUF field's value for an error line."""
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return "not readable"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def open_gguf(gguf, path: Path, fix: str):
    """gguf.GGUFReader of `path` (a regular file), every tensor's data inside the file; else one error."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, TypeError, AssertionError) as e:
        raise LlamaforgeError(f"not a GGUF file, or a damaged one ({str(e)[:100]})", path, fix) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise LlamaforgeError(f"the GGUF is truncated: tensor {t.name} runs past its end ({size} bytes)", path, fix)
    return reader


def check_gguf_of(gguf, reader, path: Path, m: ModelFolder, again: str, what: str = "the F16 GGUF") -> None:
    """A GGUF (`reader` of `path`) against the model it claims to be: the model's architecture,
    exactly the tensors (names and shapes) an export of the model holds, and its vocabulary."""
    from .quantize import gguf_string

    arch = gguf_string(reader, "general.architecture", path)
    if arch != m.family.gguf_arch:
        raise LlamaforgeError(f"{what} is of architecture {arch!r}, the model {m.folder} of "
                              f"{m.family.gguf_arch!r}: it is another model's", path, again)
    # the shapes config.json implies (open_model checked the weights against them); the head is
    # optional where the embeddings are tied
    want_shapes = {t.gguf: m.dims.shape_of(t) for t in m.family.hf_order(m.dims.n_layers)}
    want_shapes.update(extra_tensor_shapes(m))
    have = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}  # GGUF lists ne[0] first
    for name, shape in want_shapes.items():
        if name == OUTPUT.gguf and m.dims.tied and name not in have:
            continue
        if name not in have:
            raise LlamaforgeError(f"{what} has no tensor {name}, which the model's export holds", path, again)
        if have[name] != shape:
            raise LlamaforgeError(f"{what}'s {name} has shape {list(have[name])}, the model's {list(shape)}: it is "
                                  "another model's, or damaged", path, again)
    extra = sorted(set(have) - set(want_shapes))
    if extra:
        raise LlamaforgeError(f"{what} has tensor {extra[0]}, which the model's export does not "
                              f"({len(extra)} such)", path, again)
    _check_gguf_vocab(gguf, reader, path, m, again, what)


def _check_gguf_vocab(gguf, reader, path: Path, m: ModelFolder, again: str, what: str) -> None:
    """The GGUF's tokenizer.ggml.tokens against the model's tokenizer, without transformers: as many
    as the model's embedding rows, and the same token at every id the tokenizer files define."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or field.types[:2] != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
        raise LlamaforgeError(f"{what} has no vocabulary (tokenizer.ggml.tokens)", path, again)
    try:
        tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    except UnicodeDecodeError:
        raise LlamaforgeError(f"{what}'s vocabulary holds a token that is not UTF-8", path, again) from None
    if len(tokens) != m.dims.vocab:
        raise LlamaforgeError(f"{what}'s vocabulary has {len(tokens)} tokens, the model {m.dims.vocab} embedding "
                              "rows: it is another model's", path, again)
    if m.tokenizer.kind is TokenizerKind.SENTENCEPIECE:
        from .gguf_meta import _token_vocab

        expect = dict(enumerate(t.decode("utf-8") for t in _token_vocab(m)["tokens"]))
    else:
        from ..files.reading import read_json

        vocab = (read_json(m.tokenizer.json, "tokenizer.json").get("model") or {}).get("vocab") or {}
        expect = {int(i): t for t, i in vocab.items()}
    for i, token in sorted(expect.items()):
        if i < len(tokens) and tokens[i] != token:
            raise LlamaforgeError(f"{what}'s token {i} is {tokens[i]!r}, the model's tokenizer says {token!r}: it "
                                  "is another model's vocabulary", path, again)
