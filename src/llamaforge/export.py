"""Streaming exports of a merged Hugging Face LLaMA: Meta consolidated.NN.pth and GGUF; SHA256SUMS.

The export is the merge's loop with other transforms and sinks (GUIDE §1): a reader thread takes
each output tensor from the model folder (block reads with `readinto`, never a memory map), renames
it and puts q/k rows back in Meta order (`llamaforge.names`), into one of two reusable buffers; the
calling thread hands it to the sink and the buffer goes back. Memory is bounded by two copies of the
largest tensor (the embedding), never a shard or the model.

Sinks:
  * `.pth`: `torch.save`'s own zip format, written with `torch._C.PyTorchFileWriter` (what torch.save
    uses) one storage record at a time. `data.pkl` is pickled up front from the planned names,
    dtypes and shapes exactly as torch.save pickles a dict of tensors, then the records follow in
    the same order as torch.save writes them, so the file is byte-identical to `torch.save(state_dict,
    io.BytesIO())` and `torch.load(weights_only=True, mmap=True)` and Meta's code read it. The N
    files of a multi-shard export are written side by side in one pass: each tensor is read once
    and every file takes its slice (rows, or for a tensor split on dim 1 its columns, which the
    reader lays out shard after shard).
  * GGUF: gguf-py's `GGUFWriter` writes the header, metadata and tensor infos from the plan; the
    tensor data is then written here, block of rows by block of rows, converted to F16/BF16 or
    quantized to Q8_0 with `gguf.quants` (bit-exact with llama.cpp), norms and 1-D tensors in F32.

Bytes that go out unchanged (every tensor but q/k and the column slices of a multi-shard export,
in the model's own dtype) are copied from the model's safetensors file with `os.copy_file_range`,
in the kernel as `cp` does, while the in-memory copy is hashed in another thread.

Every output file is hashed while it is written: `SHA256SUMS` in the pth folder, `<file>.sha256`
beside a GGUF file, both checkable with `sha256sum -c` from inside the folder.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import LlamaforgeError
from .formats import ModelSource, TensorInfo, read_hf_config
from .fsutil import (
    GGUF_OWN_KEY, atomic_dir, atomic_file, atomic_files, guard_output, read_json, read_text, require_dir, sha256_file,
    sums_header,
)
from .names import (
    EMBED, OUTPUT, DERIVED_HF, LlamaDims, TensorName, by_hf, check_shardable, default_num_shards, dims_from_config,
    hf_order, meta_order, params_from_dims, permute_into, shard_ranges,
)

log = logging.getLogger(__name__)

_BLOCK_BYTES = 16 << 20  # one block of rows, for column slices, q/k permutations and conversions
SUMS = "SHA256SUMS"
GGUF_TYPES = ("f16", "bf16", "q8_0")
# Embedding rows beyond the tokenizer's pieces that are vocabulary padding (a multiple-of-64/128
# vocab_size), filled with [PAD{id}] tokens as llama.cpp's converter does. More is a mismatch.
MAX_VOCAB_PADDING = 128


# ---------------------------------------------------------------------------------------------
# the source: a merged (or any) Hugging Face LLaMA folder


@dataclass
class Model:
    folder: Path
    config: dict
    dims: LlamaDims
    src: ModelSource
    tokenizer: Path
    has_output: bool  # lm_head.weight is stored; without it (tied embeddings) the head is the embedding

    def hf_name(self, t: TensorName) -> str:
        """The stored tensor behind t (lm_head of a tied model is the embedding)."""
        return EMBED.hf if t == OUTPUT and not self.has_output else t.hf

    def dtype(self) -> torch.dtype:
        return self.src.info(EMBED.hf).dtype


def open_model(folder: str | os.PathLike) -> Model:
    """Open a Hugging Face LLaMA folder and check every tensor against config.json before any export."""
    folder = require_dir(folder, "model folder")
    cfg = read_hf_config(folder)
    dims = dims_from_config(cfg, folder / "config.json")
    tok = folder / "tokenizer.model"
    if not tok.is_file():
        raise LlamaforgeError(
            "no tokenizer.model in the model folder (Meta and GGUF exports carry the SentencePiece vocabulary)",
            folder, "merge with a tokenizer folder that holds tokenizer.model (tokenizer: in config.yaml), "
                    "or copy the model's tokenizer.model into the folder",
        )
    src = ModelSource(folder)
    try:
        table = by_hf(dims.n_layers)
        unknown = [k for k in src.keys() if k not in table and not DERIVED_HF.search(k)]
        if unknown:
            raise LlamaforgeError(
                f"tensor {unknown[0]} has no Meta or GGUF name ({len(unknown)} unknown tensors)", folder,
                "export plain LLaMA models (LlamaForCausalLM without extra modules)",
            )
        # Only a model with tie_word_embeddings may lack lm_head.weight.
        has_output = OUTPUT.hf in src
        for t in hf_order(dims.n_layers, with_output=has_output or not dims.tied):
            if t.hf not in src:
                raise LlamaforgeError(f"the model has no {t.hf}", folder,
                                      "the folder is incomplete or its config.json belongs to another model")
            info = src.info(t.hf)
            if tuple(info.shape) != dims.shape_of(t):
                raise LlamaforgeError(
                    f"{t.hf} has shape {list(info.shape)} but config.json implies {list(dims.shape_of(t))}", folder,
                    "use the config.json written with these weights (vocab_size must equal the embedding rows)",
                )
            if not info.dtype.is_floating_point:
                raise LlamaforgeError(f"{t.hf} is {info.dtype}, not a float tensor", folder, "export float weights")
        check_vocab_padding(tok, dims.vocab)
    except BaseException:
        src.close()
        raise
    return Model(folder, cfg, dims, src, tok, has_output)


def check_vocab_padding(tokenizer: Path, rows: int) -> int:
    """Pieces of `tokenizer` (tokenizer.model) against the model's embedding rows: more pieces, or
    more than MAX_VOCAB_PADDING missing, is an error; a few missing rows are padding (a warning).
    Returns the number of pieces."""
    from .tokenizer import load_proto

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


# ---------------------------------------------------------------------------------------------
# the stream: one output tensor at a time, in one of two reusable buffers


@dataclass(frozen=True)
class Job:
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

    @property
    def column_split(self) -> bool:
        return self.shards is not None and self.t.split_dim == 1


def plan_jobs(model: Model, names: Iterable[TensorName], n_shards: int = 1) -> list[Job]:
    jobs = []
    for t in names:
        info = model.src.info(model.hf_name(t))
        shards = tuple(shard_ranges(t, info.shape, n_shards, model.folder)) if n_shards > 1 else None
        job = Job(t, info, shards)
        if not job.column_split and model.dims.heads_of(t) is None:
            job = Job(t, info, shards, model.src.byte_range(info.name))
        jobs.append(job)
    return jobs


def _block_rows(dims: LlamaDims, job: Job) -> int:
    """Rows per block when a tensor is read in blocks (whole heads for q/k: the permutation is per head)."""
    unit = dims.hd if dims.heads_of(job.t) is not None else 1
    row = job.info.nbytes // job.info.shape[0]
    return max(unit, _BLOCK_BYTES // max(1, row) // unit * unit)


def _scratch_bytes(dims: LlamaDims, job: Job) -> int:
    """Bytes of the block buffer job's read needs (0: read straight into the output buffer)."""
    if not job.column_split and dims.heads_of(job.t) is None:
        return 0
    return _block_rows(dims, job) * (job.info.nbytes // job.info.shape[0])


def _fill(model: Model, job: Job, buf: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Read job's tensor (q/k permuted, or as column slices) from the model into the front of `buf`."""
    src, info = model.src, job.info
    if _scratch_bytes(model.dims, job) == 0:
        return src.read_flat(info.name, 0, info.numel, buf).view(info.shape)
    rows = info.shape[0]
    width = info.numel // rows
    out = buf[: info.nbytes].view(info.dtype)
    heads = model.dims.heads_of(job.t)
    step = _block_rows(model.dims, job)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        blk = src.read_flat(info.name, a * width, (b - a) * width, scratch).view(b - a, width)
        if heads is not None:
            permute_into(out.view(rows, width)[a:b], blk, (b - a) // model.dims.hd, to_meta=True)
            continue
        start = 0  # a column split: each shard's columns go to its own part of the buffer
        for c0, c1 in job.shards:
            out[start: start + rows * (c1 - c0)].view(rows, c1 - c0)[a:b].copy_(blk[:, c0:c1])
            start += rows * (c1 - c0)
    return out.view(info.shape)


class TensorStream:
    """Iterate (job, tensor) with a reader thread filling the next tensor while one is consumed.

    The tensor lives in a reused buffer: it is valid until the next item is asked for.
    """

    def __init__(self, model: Model, jobs: list[Job], depth: int = 2):
        self.model, self.jobs = model, jobs
        size = max((j.info.nbytes for j in jobs), default=0)
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):
            self._free.put(torch.empty(size, dtype=torch.uint8))
        self._out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamaforge-export-reader", daemon=True)

    def _run(self) -> None:
        try:
            scratch = torch.empty(max((_scratch_bytes(self.model.dims, j) for j in self.jobs), default=0),
                                  dtype=torch.uint8)
            for job in self.jobs:
                buf = self._free.get()
                if self._stop.is_set():
                    return
                self._out.put((job, _fill(self.model, job, buf, scratch), buf))
            self._out.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
            self._out.put(e)

    def __iter__(self) -> Iterator[tuple[Job, torch.Tensor]]:
        self._thread.start()
        prev = None
        try:
            while True:
                item = self._out.get()
                if prev is not None:
                    self._free.put(prev)
                    prev = None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                job, tensor, buf = item
                prev = buf
                yield job, tensor
        finally:
            self._stop.set()
            while self._thread.is_alive():
                self._free.put(torch.empty(0, dtype=torch.uint8))
                try:
                    self._out.get(timeout=0.05)
                except queue.Empty:
                    pass


# ---------------------------------------------------------------------------------------------
# files that hash themselves


class HashingFile:
    """Wraps a binary file opened for writing; computes its sha256 on the way (no second read).

    Large writes are hashed in a helper thread while the same bytes go to the file (both release
    the GIL). `copy_range` writes bytes that also lie unchanged in another file with
    `os.copy_file_range` (an in-kernel copy, as `cp` does) while hashing the in-memory copy; on this
    kind of machine that is several times faster than write() from user memory.
    `expect_copy((n, fd, offset))` arms it for the next write of exactly n bytes (the data record
    that torch's zip writer hands to `write`); `expect_copy(None)` disarms it.
    """

    _PARALLEL = 1 << 20  # smaller writes are hashed and written in this thread, never copied in the kernel

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self._pos = 0
        self._pool = None
        self._expect: tuple[int, int, int] | None = None

    def _hash_async(self, mv):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaforge-sha256")
        return self._pool.submit(self._h.update, mv)

    def expect_copy(self, expect: tuple[int, int, int] | None) -> None:
        self._expect = expect

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self._expect is not None and self._expect[0] == n:
            _, fd, offset = self._expect
            self._expect = None
            return self.copy_range(mv, fd, offset)
        if n >= self._PARALLEL:
            done = self._hash_async(mv)
            try:
                self._f.write(mv)
            finally:
                done.result()
        else:
            self._h.update(mv)
            self._f.write(mv)
        self._pos += n
        return n

    def copy_range(self, mv, fd: int, offset: int) -> int:
        """Append len(mv) bytes copied from `fd` at `offset`; `mv` must hold the same bytes (hashed).
        Small runs, and file systems without copy_file_range, are written from `mv` instead."""
        mv = memoryview(mv).cast("B")
        n = len(mv)
        if n < self._PARALLEL:
            return self.write(mv)
        self._f.flush()
        out = self._f.fileno()
        done = self._hash_async(mv)
        try:
            copied = 0
            try:
                while copied < n:
                    k = os.copy_file_range(fd, out, n - copied, offset + copied)
                    if k <= 0:
                        raise OSError("copy_file_range stopped early")
                    copied += k
            except (OSError, AttributeError):  # another file system, or no copy_file_range: plain write
                if copied:
                    os.lseek(out, -copied, os.SEEK_CUR)
                self._f.write(mv)
        finally:
            done.result()
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:  # the wrapped file is closed by its owner
        self._f.flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sums_text(hashes: dict[str, str], header: str = "") -> str:
    """`sha256sum` format: '<hash>  <name>' per line, sorted by name, after an optional '#' line."""
    return header + "".join(f"{h}  {name}\n" for name, h in sorted(hashes.items()))


def parse_sums(path: str | os.PathLike) -> dict[str, str]:
    """Read a SHA256SUMS / .sha256 file (as sha256sum writes it: text or '*' binary mode)."""
    path = Path(path)
    out = {}
    for n, line in enumerate(read_text(path, "checksum file").splitlines(), 1):
        if not line.strip() or line.startswith("#"):  # sha256sum -c skips comment lines too
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise LlamaforgeError(f"line {n} is not '<sha256>  <file>'", path, "regenerate it with the export")
        out[parts[1].lstrip("*").strip()] = parts[0].lower()
    return out


# ---------------------------------------------------------------------------------------------
# the .pth sink


_STORAGE_TYPES = {torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage",
                  torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}
_STORAGE = "storage"  # interned constants: pickled once and memoized, as in torch.save
_CPU = "cpu"


class _StorageRef:
    __slots__ = ("key", "type", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.type, self.numel = key, getattr(torch, _STORAGE_TYPES[dtype]), numel


class _TensorRef:
    """Pickles exactly as a contiguous CPU tensor does (Tensor._reduce_ex_internal)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(int(s) for s in shape)

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return (_STORAGE, obj.type, obj.key, _CPU, obj.numel)
        return None


def state_dict_pickle(infos: list[TensorInfo]) -> bytes:
    """torch.save's data.pkl for a dict name -> contiguous tensor, from names, dtypes and shapes alone.
    Storage keys are '0', '1', ... in dict order, as torch.save numbers them."""
    import io

    obj = {}
    for i, t in enumerate(infos):
        obj[t.name] = _TensorRef(_StorageRef(str(i), t.dtype, t.numel), t.shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)  # torch.serialization.DEFAULT_PROTOCOL
    return buf.getvalue()


class TorchZipWriter:
    """Write a torch.save-format state dict, one tensor's storage at a time, in plan order."""

    def __init__(self, fileobj, infos: list[TensorInfo]):
        self.infos = infos
        try:
            crc = torch.serialization.get_crc32_options()
            align = torch.serialization._get_storage_alignment()
        except AttributeError:  # older torch: the defaults of torch.save
            crc, align = True, 64
        self._file = fileobj
        self._w = torch._C.PyTorchFileWriter(fileobj, crc, align)
        # The records in torch.serialization._save's order.
        pkl = state_dict_pickle(infos)
        self._w.write_record("data.pkl", pkl, len(pkl))
        self._w.write_record(".format_version", "1", 1)
        a = str(align)
        self._w.write_record(".storage_alignment", a, len(a))
        self._w.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor, source: tuple[int, int] | None = None) -> None:
        """Write the next planned tensor (contiguous). `source` = (fd, offset) where the same bytes lie
        in another file: the record's data is then copied from there in the kernel (the file object
        must offer expect_copy, as HashingFile does)."""
        info = self.infos[self._next]
        if name != info.name or tuple(tensor.shape) != tuple(info.shape) or tensor.dtype != info.dtype:
            raise RuntimeError(f"{name} {tuple(tensor.shape)} {tensor.dtype} written where the plan has {info}")
        if not tensor.is_contiguous():
            raise RuntimeError(f"{name}: not a contiguous tensor")
        expect = getattr(self._file, "expect_copy", None) if source is not None else None
        if expect is not None:
            expect((info.nbytes, *source))
        try:
            start = tensor.storage_offset() * tensor.element_size()  # a view of the tensor's bytes, no copy
            self._w.write_record(f"data/{self._next}", tensor.untyped_storage()[start: start + info.nbytes],
                                 info.nbytes)
        finally:
            if expect is not None:
                expect(None)  # disarm, whether or not the data came in one piece
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.infos):
            raise RuntimeError(f"wrote {self._next} of {len(self.infos)} planned tensors")
        self._w.write_end_of_file()


def _shard_pieces(job: Job, tensor: torch.Tensor, n: int) -> list[tuple[torch.Tensor, tuple[int, int] | None]]:
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


def export_pth(model: str | os.PathLike, output: str | os.PathLike, num_shards: int | None = None,
               echo: Callable[[str], None] = print) -> dict[str, str]:
    """Write `output/` = consolidated.NN.pth + params.json + tokenizer.model + SHA256SUMS, atomically.

    All shards are written in one pass over the tensors: each tensor is read once and its slices go
    to every shard's file. Returns sha256 by file name.
    """
    guard_output(output, "pth", [("model folder", model)])
    m = open_model(model)
    try:
        dims = m.dims
        n = int(num_shards) if num_shards else default_num_shards(dims.hidden)
        if n < 1:
            raise LlamaforgeError(f"--num-shards {n} is not a positive number", None, "pass 1 or more")
        params = params_from_dims(dims, m.folder / "config.json")
        check_shardable(dims, n, m.folder)
        jobs = plan_jobs(m, meta_order(dims.n_layers), n)
        echo(f"exporting {m.folder} to Meta format: {n} shard(s), {sum(j.info.nbytes for j in jobs) / 1e9:.2f} GB "
             f"{m.dtype()}, vocabulary {dims.vocab}, params {json.dumps(params)}")
        plans: list[list[TensorInfo]] = [[] for _ in range(n)]  # each shard's tensors
        for j in jobs:
            for s, plan in enumerate(plans):
                shape = list(j.info.shape)
                if j.shards is not None and j.t.split_dim is not None:
                    shape[j.t.split_dim] = j.shards[s][1] - j.shards[s][0]
                plan.append(TensorInfo(j.t.meta, j.info.dtype, tuple(shape)))
        names = [f"consolidated.{s:02d}.pth" for s in range(n)]
        hashes: dict[str, str] = {}
        need = sum(i.nbytes for plan in plans for i in plan)
        with atomic_dir(output, need_bytes=need) as tmp:
            with contextlib.ExitStack() as stack:
                files = []
                for name in names:
                    raw = stack.enter_context(open(tmp / name, "wb", buffering=0))
                    files.append(HashingFile(raw))
                    stack.callback(files[-1].close)
                writers = [TorchZipWriter(f, plan) for f, plan in zip(files, plans)]
                for job, tensor in TensorStream(m, jobs):
                    for w, (piece, source) in zip(writers, _shard_pieces(job, tensor, n)):
                        w.write(job.t.meta, piece, source)
                for w in writers:
                    w.close()
            for name, f, plan in zip(names, files, plans):
                hashes[name] = f.hexdigest
                echo(f"  {name}: {len(plan)} tensors, {sum(i.nbytes for i in plan) / 1e9:.2f} GB")
            for name, data in (("params.json", (json.dumps(params) + "\n").encode()),
                               ("tokenizer.model", m.tokenizer.read_bytes())):
                (tmp / name).write_bytes(data)
                hashes[name] = hashlib.sha256(data).hexdigest()
            (tmp / SUMS).write_text(sums_text(hashes, sums_header("export_pth")), encoding="utf-8")
        echo(f"wrote {output}: {', '.join(sorted(hashes))}")
        return hashes
    finally:
        m.src.close()


# ---------------------------------------------------------------------------------------------
# the GGUF sink


def _gguf():
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


def _token_vocab(model: Model) -> dict:
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


def gguf_metadata(gguf, writer, model: Model, outtype: str, name: str) -> None:
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


def export_gguf(model: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16",
                name: str | None = None, echo: Callable[[str], None] = print) -> str:
    """Write the GGUF file `output` (+ `output.sha256`) atomically; return its sha256."""
    if outtype not in GGUF_TYPES:
        raise LlamaforgeError(f"unknown --outtype {outtype!r}", None, f"use one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    import numpy as np

    output = Path(output)
    if output.is_dir() and not output.is_symlink():
        raise LlamaforgeError("the GGUF output is a folder", output, "give a file name ending in .gguf")
    sums = output.with_name(output.name + ".sha256")
    guard_output(output, "gguf", [("model folder", model)])
    guard_output(sums, "sha256", [("model folder", model)])
    m = open_model(model)
    try:
        # no output.weight for tied embeddings: llama.cpp then uses token_embd, as convert_hf_to_gguf.py writes it
        jobs = plan_jobs(m, hf_order(m.dims.n_layers, with_output=m.has_output))
        qtypes = [gguf_qtype(gguf, j.t, j.info.shape, outtype) for j in jobs]
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        gguf_metadata(gguf, writer, m, outtype, name or m.folder.name)
        sizes = []
        for j, q in zip(jobs, qtypes):
            nb = gguf_nbytes(gguf, q, j.info.shape)
            sizes.append(nb)
            writer.add_tensor_info(j.t.gguf, j.info.shape, np.float32, nb, raw_dtype=q)
        echo(f"exporting {m.folder} to GGUF {outtype}: {len(jobs)} tensors, {sum(sizes) / 1e9:.2f} GB, "
             f"vocabulary {m.dims.vocab}")
        align = writer.data_alignment
        # the GGUF and its .sha256 appear together: a kill in between leaves the .sha256 missing
        with atomic_files([output, sums], need_bytes=sum(sizes)) as (tmp_gguf, tmp_sums):
            with open(tmp_gguf, "wb") as raw:
                f = HashingFile(raw)
                # GGUFWriter writes the header, metadata and tensor infos into our (hashing) file; it
                # never holds a tensor: the data is written below, one block of rows at a time.
                writer.fout = [f]
                writer.path = output
                writer.state = gguf.gguf_writer.WriterState.EMPTY
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                writer.write_padding(f, f.tell(), align)
                conv = _Converter(gguf)
                try:
                    for (job, tensor), q, nb in zip(TensorStream(m, jobs), qtypes, sizes, strict=True):
                        start = f.tell()
                        conv.write(f, q, tensor, job.source)
                        if f.tell() - start != nb:
                            raise RuntimeError(f"{job.t.gguf}: wrote {f.tell() - start} bytes, planned {nb}")
                        writer.write_padding(f, nb, align)
                finally:
                    conv.close()
                    f.close()
                digest = f.hexdigest
            tmp_sums.write_text(sums_text({output.name: digest}), encoding="utf-8")
        echo(f"wrote {output} ({output.stat().st_size / 1e9:.2f} GB) and {sums.name}")
        return digest
    finally:
        m.src.close()


class _Converter:
    """Converts tensors block by block of rows; Q8_0 blocks are quantized in two threads (numpy
    releases the GIL), and written in order."""

    def __init__(self, gguf):
        from concurrent.futures import ThreadPoolExecutor

        self.gguf = gguf
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llamaforge-quant")

    def write(self, f: HashingFile, qtype, tensor: torch.Tensor, source: tuple[int, int] | None = None) -> None:
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
        per = 4 if qtype == Q.Q8_0 else 2
        step = max(1, (_BLOCK_BYTES // per) // max(1, width * 4))
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


# ---------------------------------------------------------------------------------------------
# verification


def verify_sha256(expected: dict[str, str], sums_files: Iterable[str | os.PathLike] = (),
                  root: str | os.PathLike = ".", echo: Callable[[str], None] = print) -> list[str]:
    """Check files against expected hashes (paths relative to `root`, as in config.yaml's sha256:)
    and against SHA256SUMS / .sha256 files (names relative to each file's folder).

    Returns the report lines; raises LlamaforgeError naming the first mismatching file.
    """
    root = Path(root)
    checks: list[tuple[Path, str, str]] = []  # (file, expected hash, where the expectation comes from)
    for rel, h in expected.items():
        checks.append((root / rel, h.lower(), "config.yaml (sha256:)"))
    for sums in map(Path, sums_files):
        if not sums.is_file():
            raise LlamaforgeError("checksum file not found", sums, "build the export again")
        for name, h in parse_sums(sums).items():
            checks.append((sums.parent / name, h, os.fspath(sums)))
    lines, bad = [], []
    digests: dict[Path, str] = {}  # a file listed twice (config.yaml and SHA256SUMS) is hashed once
    for path, want, where in checks:
        if not path.is_file():
            bad.append(LlamaforgeError(f"file listed in {where} does not exist", path,
                                       "build it (snakemake <target>) or fix the path in config.yaml"))
            lines.append(f"MISSING  {path}")
            echo(lines[-1])
            continue
        key = path.resolve()
        if key not in digests:
            digests[key] = sha256_file(path)
        got = digests[key]
        if got != want:
            bad.append(LlamaforgeError(f"sha256 is {got} but {where} expects {want}", path,
                                       "the file differs from the published one: rebuild it from the right inputs, "
                                       "or correct the expected hash"))
            lines.append(f"FAILED   {path}  {got} != {want}")
        else:
            lines.append(f"OK       {path}  {got}")
        echo(lines[-1])
    if bad:
        if len(bad) > 1:
            raise LlamaforgeError(f"{bad[0]} ({len(bad) - 1} more file(s) failed)")
        raise bad[0]
    if not checks:
        lines.append("nothing to verify: no sha256: entries in config.yaml and no checksum files")
    return lines


def write_verify_report(lines: list[str], output: str | os.PathLike, inputs=()) -> None:
    guard_output(output, "text", [("checked file", p) for p in inputs])
    with atomic_file(output, "w") as f:
        f.write("# llamaforge verify\n" + "".join(line + "\n" for line in lines))
