"""The GGUF sink: the tensor types, sizes, conversions and metadata that llama.cpp's
`convert_hf_to_gguf.py` writes for a LLaMA model, with gguf-py (`gguf`) for the header.

gguf-py's `GGUFWriter` writes the header, the key-value metadata and the tensor infos from the
plan; the tensor data is written here, block of rows by block of rows, converted to F16/BF16 or
quantized to Q8_0 with `gguf.quants` (bit-exact with llama.cpp), norms and 1-D tensors in F32.
"""

from __future__ import annotations

import collections
import math

import torch

from .errors import LlamaforgeError
from .fsutil import GGUF_OWN_KEY, read_json
from .names import TensorName
from .stream import BLOCK_ELEMS, HashingWriter, block_rows

GGUF_TYPES = ("f16", "bf16", "q8_0")


def load_gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency
        raise LlamaforgeError("the gguf package is not installed", None, "pip install gguf") from None
    return gguf


def gguf_qtype(gguf, t: TensorName, shape: tuple[int, ...], outtype: str):
    """The GGML type of a tensor, as convert_hf_to_gguf.py (TextModel.prepare_tensors) chooses it:
    1-D tensors and norms F32; everything else the requested type, token_embd and output included;
    a Q8_0 tensor whose rows are not a multiple of the 32-element block falls back to F16 (the
    QuantError fallback there)."""
    Q = gguf.GGMLQuantizationType
    if t.norm or len(shape) <= 1:
        return Q.F32
    if outtype == "f16":
        return Q.F16
    if outtype == "bf16":
        return Q.BF16
    block, _ = gguf.GGML_QUANT_SIZES[Q.Q8_0]
    return Q.Q8_0 if shape[-1] % block == 0 else Q.F16


def gguf_nbytes(gguf, qtype, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _convert_block(gguf, qtype, block: torch.Tensor) -> memoryview:
    """One block of rows in the GGML type (row-wise, so blocks concatenate to the whole tensor)."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return memoryview(block.to(torch.float32).contiguous().numpy()).cast("B")
    if qtype == Q.F16:
        return memoryview(block.to(torch.float16).contiguous().numpy()).cast("B")
    if qtype == Q.BF16:
        return memoryview(block.to(torch.bfloat16).contiguous().view(torch.int16).numpy()).cast("B")
    q = gguf.quants.quantize(block.to(torch.float32).numpy(), qtype)
    return memoryview(q).cast("B")


def _token_vocab(model) -> dict:
    """tokens, scores, types and special ids from tokenizer.model (+ special_tokens_map.json, and
    config.json's pad_token_id when they name no pad), padded to the embedding rows as
    convert_hf_to_gguf.py's _create_vocab_sentencepiece does."""
    from .tokenizer import UNUSED, load_proto, special_ids

    proto = load_proto(model.tokenizer, "tokenizer.model")
    vocab = model.dims.vocab
    pieces = proto.pieces
    if len(pieces) > vocab:
        raise LlamaforgeError(
            f"tokenizer.model has {len(pieces)} pieces but the model has {vocab} embedding rows", model.tokenizer,
            "use the tokenizer the model was merged with",
        )
    tokens = [p.piece.encode("utf-8") for p in pieces]
    scores = [float(p.score) for p in pieces]
    # sentencepiece_model.proto numbers its types as gguf.TokenType does:
    # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    types = [int(p.type) for p in pieces]
    for i in range(len(pieces), vocab):
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-10000.0)
        types.append(UNUSED)
    ids = special_ids(proto, model.folder)
    if "pad" not in ids and model.config.get("pad_token_id") is not None:
        pid = int(model.config["pad_token_id"])
        if 0 <= pid < vocab:
            ids["pad"] = pid
    add_bos, add_eos = True, False
    tc_path = model.folder / "tokenizer_config.json"
    if tc_path.is_file():
        tc = read_json(tc_path, "tokenizer_config.json")
        add_bos = bool(tc.get("add_bos_token", True))
        add_eos = bool(tc.get("add_eos_token", False))
    return {"tokens": tokens, "scores": scores, "types": types, "ids": ids, "add_bos": add_bos, "add_eos": add_eos,
            "pieces": len(pieces)}


def gguf_metadata(gguf, writer, model, outtype: str, name: str) -> None:
    """The KV metadata of convert_hf_to_gguf.py's LlamaModel (TextModel.set_gguf_parameters,
    LlamaModel.set_gguf_parameters, _set_vocab_sentencepiece)."""
    from .names import rope_settings

    d = model.dims
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(d.n_layers)
    writer.add_context_length(d.max_positions)
    writer.add_embedding_length(d.hidden)
    writer.add_feed_forward_length(d.intermediate)
    writer.add_head_count(d.n_heads)
    writer.add_head_count_kv(d.n_kv_heads)
    writer.add_rope_freq_base(d.rope_theta)
    writer.add_layer_norm_rms_eps(d.norm_eps)
    writer.add_file_type(ftype)
    writer.add_vocab_size(d.vocab)
    writer.add_rope_dimension_count(d.hd)
    if d.head_dim and d.head_dim * d.n_heads != d.hidden:
        writer.add_key_length(d.hd)
        writer.add_value_length(d.hd)
    _, rtype, rp = rope_settings(model.config)
    if rtype == "linear" and rp.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype not in ("default", None):
        raise LlamaforgeError(f"rope scaling {rtype!r} is not supported by this exporter", model.folder / "config.json",
                              "export with llama.cpp's convert_hf_to_gguf.py")
    v = _token_vocab(model)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(v["tokens"])
    writer.add_token_scores(v["scores"])
    writer.add_token_types(v["types"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if key in v["ids"]:
            add(v["ids"][key])
    writer.add_add_bos_token(v["add_bos"])
    writer.add_add_eos_token(v["add_eos"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # by this key a later run knows the file as its own output (and may replace it)
    from . import __version__

    writer.add_string(GGUF_OWN_KEY, __version__)



def begin_gguf_file(gguf, writer, f: HashingWriter, path) -> None:
    """Have gguf-py's `writer` (made with path=None and every KV and tensor info added) write the
    header, the metadata and the tensor infos into our file `f`, padded to the data's alignment.

    gguf-py has no public call for "write everything but the tensor data to this file object":
    this sets its internal state (`fout`, `path`, `state = WriterState.EMPTY`) as `open_output_file`
    would, then calls its own write_*_to_file methods. Checked on gguf 0.19.0; a gguf-py
    that changes these internals fails here loudly (AttributeError), not with a wrong file.
    """
    writer.fout = [f]
    writer.path = path
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_padding(f, f.tell(), writer.data_alignment)


class Converter:
    """Converts tensors block by block of rows; Q8_0 blocks are quantized in two threads (numpy
    releases the GIL), and written in order."""

    def __init__(self, gguf):
        from concurrent.futures import ThreadPoolExecutor

        self.gguf = gguf
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamaforge-quant")

    def write(self, f: HashingWriter, qtype, tensor: torch.Tensor, source: tuple[int, int] | None = None) -> None:
        Q = self.gguf.GGMLQuantizationType
        rows = tensor.shape[0] if tensor.dim() > 1 else 1
        flat = tensor.reshape(rows, -1)
        same = (qtype == Q.F16 and tensor.dtype == torch.float16) or (qtype == Q.F32 and tensor.dtype == torch.float32) \
            or (qtype == Q.BF16 and tensor.dtype == torch.bfloat16)
        if same:  # bytes pass straight through (copied in the kernel when they lie in a file as they are)
            mv = memoryview(flat.view(torch.uint8).numpy()).cast("B")
            if source is not None:
                f.copy_range(mv, *source)
            else:
                f.write(mv)
            return
        width = flat.shape[1]
        # quantizing holds several float32 temporaries per value, in two threads: half-size blocks
        step = block_rows(width, values=BLOCK_ELEMS // 2 if qtype == Q.Q8_0 else BLOCK_ELEMS)
        blocks = [flat[a:a + step] for a in range(0, rows, step)]
        if qtype != Q.Q8_0 or len(blocks) == 1:
            for b in blocks:
                f.write(_convert_block(self.gguf, qtype, b))
            return
        pending: collections.deque = collections.deque()
        for b in blocks:
            pending.append(self._pool.submit(_convert_block, self.gguf, qtype, b))
            if len(pending) >= 3:
                f.write(pending.popleft().result())
        while pending:
            f.write(pending.popleft().result())

    def close(self) -> None:
        self._pool.shutdown(wait=True)

