"""The export's source and stream: the model folder checked for export (`open_model`: tensors,
tokenizer, vocabulary; `describe_model`: metadata only), and each output tensor read whole into one
of two reusable buffers, q/k rows permuted, value offsets added or a shard's columns gathered in
the reader thread (`plan_reads`, `tensor_stream`). Memory is bounded by two copies of the largest
tensor, never a shard or the model. No torch at import: only where a tensor is read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import LlamaforgeError
from ..model import (
    DERIVED_HF,
    EMBED,
    OUTPUT,
    ModelFolder,
    TensorName,
    TokenizerKind,
    shard_ranges,
)

if TYPE_CHECKING:  # torch, the weight files and the stream only where tensors are read or written
    import torch

    from ..formats.dtypes import TensorInfo


log = logging.getLogger(__name__)


# Embedding rows beyond the tokenizer's pieces that are vocabulary padding (a multiple-of-64/128
# vocab_size), filled with [PAD{id}] tokens as llama.cpp's converter does. More is a mismatch.
MAX_VOCAB_PADDING = 128


def describe_model(folder: str | os.PathLike) -> ModelFolder:
    """The model folder an export reads, its metadata checked without reading a tensor (no torch): a
    tokenizer whose vocabulary Meta and GGUF files can carry, that fits the embedding rows."""
    m = ModelFolder(folder)
    _check_tokenizer_kind(m)
    _check_vocab(m)
    return m


def open_model(folder: str | os.PathLike) -> ModelFolder:
    """describe_model's checks, and every tensor checked against config.json first, before any
    export (the tensor index stays open: close the ModelFolder when done)."""
    m = ModelFolder(folder)
    try:
        _check_tokenizer_kind(m)
        _check_tensors(m)
        _check_vocab(m)
    except BaseException:
        m.close()
        raise
    return m


def has_output(m: ModelFolder) -> bool:
    """lm_head.weight is stored; without it (tied embeddings) the head is the embedding."""
    return OUTPUT.hf in m.tensors()


def _check_tokenizer_kind(m: ModelFolder) -> None:
    kind = m.tokenizer.kind
    if kind is TokenizerKind.NONE:
        raise LlamaforgeError(
            "no tokenizer in the model folder (tokenizer.model or tokenizer.json: Meta and GGUF exports carry the "
            "vocabulary)", m.path, "merge with a tokenizer folder (tokenizer: in config.yaml), or copy the "
            "model's tokenizer files into the folder")
    if kind is TokenizerKind.JSON:
        raise LlamaforgeError(
            "no tokenizer.model in the model folder, and its tokenizer.json is a SentencePiece-style one (Meta and "
            "GGUF exports carry the SentencePiece vocabulary itself)", m.path,
            "merge with a tokenizer folder that holds tokenizer.model (tokenizer: in config.yaml), or copy the "
            "model's tokenizer.model into the folder")


def _check_vocab(m: ModelFolder) -> None:
    rows = m.dims.vocab
    if m.tokenizer.kind is TokenizerKind.SENTENCEPIECE:
        check_vocab_padding(m.tokenizer.model, rows, len(m.sentencepiece.pieces))
        if m.vocab_length > rows:
            raise LlamaforgeError(f"the tokenizer has {m.vocab_length} tokens (ids up to {m.vocab_length - 1}) but the "
                                  f"model has {rows} embedding rows", m.path,
                                  "use the tokenizer the model was trained or merged with")
    elif m.vocab_length > rows:  # byte-level BPE: releases pad the embeddings freely (Qwen2: 151936 rows, 151665 tokens)
        raise LlamaforgeError(f"the tokenizer has {m.vocab_length} tokens but the model has only {rows} "
                              "embedding rows", m.tokenizer.json, "use the tokenizer the model was merged with")


def _check_tensors(m: ModelFolder) -> None:
    dims, fam, src = m.dims, m.family, m.tensors()
    table = fam.by_hf(dims.n_layers)
    unknown = [k for k in src.keys() if k not in table and not DERIVED_HF.search(k)]
    if unknown:
        raise LlamaforgeError(
            f"tensor {unknown[0]} has no Meta or GGUF name ({len(unknown)} unknown tensors)", m.path,
            f"export plain {fam.architecture} models (without extra modules)",
        )
    # Only a model with tie_word_embeddings may lack lm_head.weight.
    for t in fam.hf_order(dims.n_layers, with_output=has_output(m) or not dims.tied):
        if t.hf not in src:
            raise LlamaforgeError(f"the model has no {t.hf}", m.path,
                                  "the folder is incomplete or its config.json belongs to another model")
        info = src.info(t.hf)
        if tuple(info.shape) != dims.shape_of(t):
            raise LlamaforgeError(
                f"{t.hf} has shape {list(info.shape)} but config.json implies {list(dims.shape_of(t))}", m.path,
                "use the config.json written with these weights (vocab_size must equal the embedding rows)",
            )
        if not info.is_float:
            raise LlamaforgeError(f"{t.hf} is {info.dtype}, not a float tensor", m.path, "export float weights")


def check_vocab_padding(tokenizer: Path, rows: int, pieces: int | None = None) -> int:
    """Pieces of `tokenizer` (tokenizer.model) against the model's embedding rows: more pieces, or
    more than MAX_VOCAB_PADDING missing, is an error; a few missing rows are padding (a warning).
    Returns the number of pieces."""
    from ..tokenizer import load_proto

    if pieces is None:  # (a ModelFolder gives the count of the model it parsed once)
        pieces = len(load_proto(tokenizer, "tokenizer.model").pieces)
    fix = ("merge with the tokenizer that belongs to the adapters: LLaMA has 32000 pieces, Chinese-LLaMA 49953, "
           "Chinese-Alpaca 49954 (+[PAD]) (tokenizer: in config.yaml, or --tokenizer)")
    if pieces > rows:
        raise LlamaforgeError(f"tokenizer.model has {pieces} pieces but the model has only {rows} embedding rows",
                              tokenizer, fix)
    if rows - pieces > MAX_VOCAB_PADDING:
        raise LlamaforgeError(
            f"tokenizer.model has {pieces} pieces but the model has {rows} embedding rows ({rows - pieces} more, "
            f"beyond the {MAX_VOCAB_PADDING} rows of vocabulary padding an export fills in)", tokenizer, fix)
    if rows > pieces:
        log.warning("%s: %d pieces for %d embedding rows: the %d rows beyond are vocabulary padding, exported "
                    "as [PAD<id>] tokens", tokenizer, pieces, rows, rows - pieces)
    return pieces


@dataclass(frozen=True)
class TensorRead:
    """One output tensor, read whole: t (its names) from the stored tensor `info` (its dtype and full
    shape), q/k rows in Meta order. `shards`: its range along t.split_dim in each consolidated.NN.pth
    of a multi-shard export (None otherwise); a tensor split on dim 1 is then laid out in the buffer
    as each shard's columns, one shard after another. `source` = (fd, byte offset) when the buffer
    holds the bytes of one contiguous run of a safetensors file, unchanged (a sink may then copy them
    in the kernel)."""
    t: TensorName
    info: TensorInfo
    shards: tuple[tuple[int, int] | None, ...] | None = None
    source: tuple[int, int] | None = None
    heads: int | None = None  # q/k rows permuted to Meta/GGUF order, per head: the head count

    @property
    def transformed(self) -> bool:
        """The tensor is rearranged on the way (q/k permuted, or gathered as column slices)."""
        return self.column_split or self.heads is not None or self.t.offset != 0

    @property
    def column_split(self) -> bool:
        return self.shards is not None and self.t.split_dim == 1


def plan_reads(model: ModelFolder, names: Iterable[TensorName], n_shards: int = 1,
               permute: bool = True) -> list[TensorRead]:
    """The reads of `names` from the model: q/k rows permuted when `permute` (Meta; the GGUF of a
    family whose entry says permute_qk), each shard's range with n_shards > 1."""
    src = model.tensors()
    head = OUTPUT.hf in src
    reads = []
    for t in names:
        info = src.info(EMBED.hf if t == OUTPUT and not head else t.hf)  # a tied head is the embedding
        shards = tuple(shard_ranges(t, info.shape, n_shards, model.path)) if n_shards > 1 else None
        r = TensorRead(t, info, shards, heads=model.dims.heads_of(t) if permute else None)
        if not r.transformed:
            r = TensorRead(t, info, shards, src.byte_range(info.name))
        reads.append(r)
    return reads


def _block_rows(model: ModelFolder, r: TensorRead) -> int:
    """Rows per block of a rearranged tensor (whole heads for q/k: the permutation is per head)."""
    from ..formats.stream import COPY_BLOCK_ELEMS, block_rows

    unit = model.dims.hd if r.heads is not None else 1
    return block_rows(r.info.numel // r.info.shape[0], unit, values=COPY_BLOCK_ELEMS)


def _fill(model: ModelFolder, r: TensorRead, buf: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Read r's tensor into the front of the torch buffer `buf`: _fill_raw on the same memory, seen
    as a tensor of the stored dtype, plus the entry's value offset (in that dtype)."""
    import torch

    raw = _fill_raw(model, r, buf.numpy(), scratch.numpy())
    out = torch.from_numpy(raw.reshape(-1)).view(r.info.dtype).view(r.info.shape)
    return out.add_(r.t.offset) if r.t.offset else out


def raw_bytes_suffice(reads: list[TensorRead]) -> bool:
    """Whether the stream can carry these tensors as raw bytes in numpy buffers, without torch: their
    values are only copied, permuted or gathered (no value offset to add)."""
    return all(r.t.offset == 0 for r in reads)


def tensor_stream(model: ModelFolder, reads: list[TensorRead], raw: bool = False):
    """The export's stream: whole tensors, each valid until the next is asked for (the pth sink
    needs whole records), read and rearranged in the reader thread. raw=True (raw_bytes_suffice):
    numpy buffers, each tensor as unsigned integers of its element size (no torch)."""
    from ..formats.stream import BlockReader, Read, numpy_bytes, torch_bytes

    alloc, fill = (numpy_bytes, _fill_raw) if raw else (torch_bytes, _fill)

    def blocks():
        scratch_bytes = max((_block_rows(model, r) * (r.info.nbytes // r.info.shape[0])
                             for r in reads if r.transformed), default=0)
        scratch = alloc(scratch_bytes)  # the reader thread's own
        for r in reads:
            yield Read(r, r.info.nbytes, lambda buf, r=r: fill(model, r, buf, scratch))

    size = max((r.info.nbytes for r in reads), default=0)
    return BlockReader(blocks(), size, depth=2, recycle=True, name="llamaforge-export-reader", alloc=alloc)


def _fill_raw(model: ModelFolder, r: TensorRead, buf, scratch):
    """Read r's tensor (q/k permuted, or as column slices) from the model into the front of the numpy
    buffer `buf`, its values as unsigned integers of their size: a copy, a permutation or a gather
    moves values and never computes with them, so no torch is needed (a value offset is _fill's)."""
    import numpy as np

    src, info = model.tensors(), r.info
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[info.itemsize]
    if r.heads is None and not r.column_split:
        return src.read_flat(info.name, 0, info.numel, buf).view(uint).reshape(info.shape)
    rows = info.shape[0]
    width = info.numel // rows
    out = buf[: info.nbytes].view(uint)
    step = _block_rows(model, r)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        blk = src.read_flat(info.name, a * width, (b - a) * width, scratch).view(uint).reshape(b - a, width)
        if r.heads is not None:
            heads, half = (b - a) // model.dims.hd, model.dims.hd // 2
            # HF's rotary halves -> interleaved pairs, per head (permute_into's to_meta)
            out.reshape(rows, width)[a:b].reshape(heads, half, 2, width)[...] = \
                blk.reshape(heads, 2, half, width).swapaxes(1, 2)
            continue
        start = 0  # a column split: each shard's columns go to its own part of the buffer
        for c0, c1 in r.shards:
            out[start: start + rows * (c1 - c0)].reshape(rows, c1 - c0)[a:b] = blk[:, c0:c1]
            start += rows * (c1 - c0)
    return out.reshape(info.shape)


def _shard_pieces(job: TensorRead, tensor: torch.Tensor, n: int) -> list[tuple[torch.Tensor, tuple[int, int] | None]]:
    """(tensor, source) of each of the n consolidated.NN.pth files for one output tensor."""
    if job.shards is None or job.t.split_dim is None:
        return [(tensor, job.source)] * n
    rows = job.info.shape[0]
    if job.t.split_dim == 1:  # the buffer holds each shard's columns, one shard after another
        flat, start, out = tensor.reshape(-1), 0, []
        for c0, c1 in job.shards:
            out.append((flat[start: start + rows * (c1 - c0)].view(rows, c1 - c0), None))
            start += rows * (c1 - c0)
        return out
    row = job.info.nbytes // rows
    return [(tensor[r0:r1], None if job.source is None else (job.source[0], job.source[1] + r0 * row))
            for r0, r1 in job.shards]
