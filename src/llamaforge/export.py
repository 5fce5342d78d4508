"""Exports of a merged Hugging Face LLaMA: Meta consolidated.NN.pth and GGUF, with checksums.

An export is a consumer of the stream (`llamaforge.stream`): the reader thread reads each output
tensor from the model folder (block reads, never a memory map), renames it (`llamaforge.names`)
and, block by block, puts q/k rows back in Meta order or gathers a multi-shard export's column
slices, into one of two reusable buffers; the calling thread hands it to a sink and the buffer
goes back. Memory is bounded by two copies of the largest tensor (the embedding), never a shard
or the model.

Sinks: `llamaforge.pth` (torch.save's zip format; all N shards in one pass, each tensor read once
and its slices sent to every shard's file) and `llamaforge.gguf_file` (converted or quantized
block by block). Bytes that go out unchanged (every tensor but q/k and the column slices, in the
model's own dtype) are copied from the model's safetensors file with `os.copy_file_range`, in the
kernel as `cp` does, while the in-memory copy is hashed (`stream.HashingWriter`).
`llamaforge.checksums` writes `SHA256SUMS` and `<file>.sha256` from those hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .checksums import SUMS, sums_text
from .errors import LlamaforgeError
from .fsutil import atomic_dir, atomic_files, guard_output, sha256_file, sums_header
from .gguf_file import (
    GGUF_TYPES, Converter, begin_gguf_file, extra_tensor_shapes, extra_tensors, gguf_metadata, gguf_nbytes, gguf_qtype,
    load_gguf,
)
from .model import (
    DERIVED_HF, EMBED, OUTPUT, ModelFolder, TensorName, TokenizerKind, check_shardable, default_num_shards,
    meta_order, params_from_dims, permute_into, shard_ranges,
)

if TYPE_CHECKING:  # torch, the weight files and the stream only where tensors are read or written
    import torch

    from .formats import TensorInfo

log = logging.getLogger(__name__)

# Embedding rows beyond the tokenizer's pieces that are vocabulary padding (a multiple-of-64/128
# vocab_size), filled with [PAD{id}] tokens as llama.cpp's converter does. More is a mismatch.
MAX_VOCAB_PADDING = 128


# ---------------------------------------------------------------------------------------------
# the source: a merged (or any) Hugging Face LLaMA folder


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
        check_vocab_padding(m.tokenizer.model, rows)
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
        if not info.dtype.is_floating_point:
            raise LlamaforgeError(f"{t.hf} is {info.dtype}, not a float tensor", m.path, "export float weights")


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
    from .stream import COPY_BLOCK_ELEMS, block_rows

    unit = model.dims.hd if r.heads is not None else 1
    return block_rows(r.info.numel // r.info.shape[0], unit, values=COPY_BLOCK_ELEMS)


def _fill(model: ModelFolder, r: TensorRead, buf: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Read r's tensor (q/k permuted, or as column slices) from the model into the front of `buf`."""
    src, info = model.tensors(), r.info
    if not r.transformed:
        return src.read_flat(info.name, 0, info.numel, buf).view(info.shape)
    if not r.column_split and r.heads is None:  # a value offset (the family's tensor entry), in the stored dtype
        return src.read_flat(info.name, 0, info.numel, buf).view(info.shape).add_(r.t.offset)
    rows = info.shape[0]
    width = info.numel // rows
    out = buf[: info.nbytes].view(info.dtype)
    heads = r.heads
    step = _block_rows(model, r)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        blk = src.read_flat(info.name, a * width, (b - a) * width, scratch).view(b - a, width)
        if heads is not None:
            permute_into(out.view(rows, width)[a:b], blk, (b - a) // model.dims.hd, to_meta=True)
            continue
        start = 0  # a column split: each shard's columns go to its own part of the buffer
        for c0, c1 in r.shards:
            out[start: start + rows * (c1 - c0)].view(rows, c1 - c0)[a:b].copy_(blk[:, c0:c1])
            start += rows * (c1 - c0)
    return out.view(info.shape)


def tensor_stream(model: ModelFolder, reads: list[TensorRead]):
    """The export's stream: whole tensors, each valid until the next is asked for (the pth sink
    needs whole records), read and rearranged in the reader thread."""
    import torch

    from .stream import BlockReader, Read

    def blocks():
        scratch_bytes = max((_block_rows(model, r) * (r.info.nbytes // r.info.shape[0])
                             for r in reads if r.transformed), default=0)
        scratch = torch.empty(scratch_bytes, dtype=torch.uint8)  # the reader thread's own
        for r in reads:
            yield Read(r, r.info.nbytes, lambda buf, r=r: _fill(model, r, buf, scratch))

    size = max((r.info.nbytes for r in reads), default=0)
    return BlockReader(blocks(), size, depth=2, recycle=True, name="llamaforge-export-reader")


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



def export_pth(model: str | os.PathLike, output: str | os.PathLike, num_shards: int | None = None,
               echo: Callable[[str], None] = print) -> dict[str, str]:
    """Write `output/` = consolidated.NN.pth + params.json + tokenizer.model + SHA256SUMS, atomically.

    All shards are written in one pass over the tensors: each tensor is read once and its slices go
    to every shard's file. Returns sha256 by file name.
    """
    from .formats import TensorInfo
    from .pth import TorchZipWriter
    from .stream import HashingWriter

    guard_output(output, "pth", [("model folder", model)])
    m = open_model(model)
    try:
        dims = m.dims
        if not m.family.meta:
            raise LlamaforgeError(
                f"{m.family.architecture} has no Meta consolidated.NN.pth format (Meta's is LLaMA's alone)",
                m.folder / "config.json", "export it as Hugging Face (hf) or GGUF (gguf-f16, gguf-q8_0) instead")
        n = int(num_shards) if num_shards else default_num_shards(dims.hidden)
        if n < 1:
            raise LlamaforgeError(f"--num-shards {n} is not a positive number", None, "pass 1 or more")
        params = params_from_dims(dims, m.folder / "config.json")
        rtype, rp = m.rope.type, m.rope.parameters
        if str(rtype).lower() == "llama3":  # Llama-3.1/3.2: Meta's reference code scales its rope frequencies
            params["use_scaled_rope"] = True
            if float(rp.get("factor", 8.0)) != 8.0:
                params["rope_scaling_factor"] = float(rp["factor"])  # 3.2's 32 (llama-models' ModelArgs)
        elif rtype not in ("default", None):
            raise LlamaforgeError(f"rope scaling {rtype!r} has no Meta params.json form", m.folder / "config.json",
                                  "export this model to GGUF or Hugging Face format instead")
        if m.tokenizer.kind is TokenizerKind.SENTENCEPIECE:
            tokenizer_bytes = m.tokenizer.model.read_bytes()
        else:  # Llama-3: Meta's tokenizer.model is tiktoken's text form of the BPE ranks
            from .tokenizer import tiktoken_model

            tokenizer_bytes = tiktoken_model(m.tokenizer.json)
        check_shardable(dims, n, m.folder)
        jobs = plan_reads(m, meta_order(dims.n_layers), n)
        echo(f"exporting {m.folder} to Meta format: {n} shard(s), {sum(j.info.nbytes for j in jobs) / 1e9:.2f} GB "
             f"{m.tensors().info(EMBED.hf).dtype}, vocabulary {dims.vocab}, params {json.dumps(params)}")
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
                    files.append(HashingWriter(raw))
                    stack.callback(files[-1].close)
                writers = [TorchZipWriter(f, plan) for f, plan in zip(files, plans)]
                for blk in tensor_stream(m, jobs):
                    job, tensor = blk.key, blk.data
                    for w, (piece, source) in zip(writers, _shard_pieces(job, tensor, n)):
                        w.write(job.t.meta, piece, source)
                for w in writers:
                    w.close()
            for name, f, plan in zip(names, files, plans):
                hashes[name] = f.hexdigest
                echo(f"  {name}: {len(plan)} tensors, {sum(i.nbytes for i in plan) / 1e9:.2f} GB")
            for name, data in (("params.json", (json.dumps(params) + "\n").encode()),
                               ("tokenizer.model", tokenizer_bytes)):
                (tmp / name).write_bytes(data)
                hashes[name] = hashlib.sha256(data).hexdigest()
            (tmp / SUMS).write_text(sums_text(hashes, sums_header("export_pth")), encoding="utf-8")
        echo(f"wrote {output}: {', '.join(sorted(hashes))}")
        return hashes
    finally:
        m.close()



def export_gguf(model: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16",
                name: str | None = None, echo: Callable[[str], None] = print, modelfile: dict | None = None,
                threads: int = 0, from_f16: str | os.PathLike | None = None) -> str:
    """Write the GGUF file `output` (+ `output.sha256`, + `{stem}.Modelfile` for Ollama unless
    modelfile is None) atomically; return its sha256.

    f16, bf16 and q8_0 are written here; the llama.cpp types (q4_0 ... q6_k, quantize.LLAMA_CPP_TYPES)
    are made by llama.cpp's own quantizer from the F16 GGUF written here first (a temporary file).
    `modelfile`: the generation parameters for the Modelfile (Ollama's names: temperature, top_k,
    top_p, repeat_penalty, num_predict). `from_f16`: quantize this F16 GGUF of `model`, written by
    llamaforge before (the workflow's exports/{model}/{model}-f16.gguf), instead of writing one."""
    from .quantize import LLAMA_CPP_TYPES, check_gguf_name, check_parameters, load_llama_cpp, modelfile_path

    quantized = outtype in LLAMA_CPP_TYPES
    if outtype not in GGUF_TYPES and not quantized:
        raise LlamaforgeError(f"unknown --outtype {outtype!r}", None,
                              f"use one of {', '.join(GGUF_TYPES + LLAMA_CPP_TYPES)}")
    if quantized:
        load_llama_cpp(outtype)  # before anything is read: without it, one line saying what to install
    elif from_f16 is not None:
        raise LlamaforgeError(f"--from-f16 is for the llama.cpp types, not {outtype}", from_f16,
                              f"drop --from-f16, or ask for one of {', '.join(LLAMA_CPP_TYPES)}")
    gguf = load_gguf()
    output = Path(output)
    if output.is_dir() and not output.is_symlink():
        raise LlamaforgeError("the GGUF output is a folder", output, "give a file name ending in .gguf")
    sums = output.with_name(output.name + ".sha256")
    mfile = modelfile_path(output) if modelfile is not None else None
    if mfile is not None:
        check_gguf_name(output)
        modelfile = check_parameters(modelfile)
    inputs = [("model folder", model), ("F16 GGUF", from_f16)]
    guard_output(output, "gguf", inputs)
    guard_output(sums, "sha256", inputs)
    if mfile is not None:
        guard_output(mfile, "modelfile", inputs)
    # quantizing a given F16 reads only its metadata of the model folder: no tensor, no torch
    m = describe_model(model) if from_f16 is not None else open_model(model)
    try:
        f16_info = check_f16(gguf, Path(from_f16), m) if from_f16 is not None else None
        targets = [output, sums] + ([mfile] if mfile is not None else [])
        # quantizing a given F16 needs no plan of our own: its size and chat template are in the file
        plan = f16_info or _plan_gguf(gguf, m, "f16" if quantized else outtype, name or m.folder.name)
        need = plan["bytes"] * (2 if quantized else 1)
        echo(f"exporting {m.folder} ({m.family.architecture}) to GGUF {outtype}: {plan['tensors']} tensors, "
             f"{plan['bytes'] / 1e9:.2f} GB{' in F16, then llama.cpp quantizes' if quantized else ''}, "
             f"vocabulary {m.dims.vocab}")
        # the GGUF, its .sha256 and its Modelfile appear together: a kill in between leaves the last missing
        with atomic_files(targets, need_bytes=need) as tmps:
            tmp_gguf, tmp_sums = tmps[0], tmps[1]
            if quantized:
                from .fsutil import scratch_file
                from .quantize import fallbacks, quantize_gguf, type_summary

                if from_f16 is not None:
                    quantize_gguf(from_f16, tmp_gguf, outtype, threads)
                else:
                    with scratch_file(output, output.stem + "-f16.gguf") as f16:
                        _write_gguf(gguf, m, plan, f16, output)
                        quantize_gguf(f16, tmp_gguf, outtype, threads)
                digest = sha256_file(tmp_gguf)
                echo(f"llama.cpp quantized it to {outtype}: {type_summary(tmp_gguf)}")
                fell = fallbacks(tmp_gguf, outtype)
                if outtype.endswith(("_k", "_k_s", "_k_m", "_k_l")) and not fell:
                    echo("no tensor fell back: every matrix has rows that are a multiple of 256")
                if fell:
                    echo(f"{len(fell)} tensor(s) fell back to another type (rows not a multiple of 256): "
                         + ", ".join(f"{n} {t}" for n, t in fell[:12]) + (" ..." if len(fell) > 12 else ""))
            else:
                digest = _write_gguf(gguf, m, plan, tmp_gguf, output)
            tmp_sums.write_text(sums_text({output.name: digest}), encoding="utf-8")
            if mfile is not None:
                from .quantize import modelfile_text

                template = plan["chat_template"]
                tmps[2].write_text(modelfile_text(output.name, template, modelfile), encoding="utf-8")
        from .fsutil import remember_sha256

        remember_sha256(output, digest)  # hashed as written: --from-f16 of it then reads it once, not twice
        echo(f"wrote {output} ({output.stat().st_size / 1e9:.2f} GB), {sums.name}"
             + (f" and {mfile.name}" if mfile is not None else ""))
        return digest
    finally:
        m.close()


def check_f16(gguf, path: Path, m: ModelFolder) -> dict:
    """--from-f16 must be the F16 GGUF llamaforge wrote of this very model: a regular file whose
    `.sha256` beside it holds its hash, with the ownership key, file type F16, the model's
    architecture, exactly the tensors (names and shapes) an export of the model writes, and its
    vocabulary, token by token. Checked before llama.cpp sees it (which would quantize any of them,
    or crash). Returns its size, tensor count and chat template."""
    from .fsutil import GGUF_OWN_KEY, require_regular_file, sha256_cached
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
    from .fsutil import GGUF_OWN_KEY
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
    types = {n: gguf.GGMLQuantizationType.F32 for n, _ in extra_tensor_shapes(m)}
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
        from .gguf_file import _token_vocab

        expect = dict(enumerate(t.decode("utf-8") for t in _token_vocab(m)["tokens"]))
    else:
        from .fsutil import read_json

        vocab = (read_json(m.tokenizer.json, "tokenizer.json").get("model") or {}).get("vocab") or {}
        expect = {int(i): t for t, i in vocab.items()}
    for i, token in sorted(expect.items()):
        if i < len(tokens) and tokens[i] != token:
            raise LlamaforgeError(f"{what}'s token {i} is {tokens[i]!r}, the model's tokenizer says {token!r}: it "
                                  "is another model's vocabulary", path, again)


def _plan_gguf(gguf, m: ModelFolder, outtype: str, name: str) -> dict:
    """The GGUFWriter with every key and tensor info, the reads, types and sizes of one export."""
    import numpy as np

    # llama.cpp's llama architecture (LLaMA, Mistral) wants q/k interleaved as Meta stores them; its
    # qwen2 architecture ropes the halves as Hugging Face does: the family entry's permute_qk.
    # No output.weight for tied embeddings: llama.cpp then uses token_embd, as convert_hf_to_gguf.py writes it
    jobs = plan_reads(m, m.family.hf_order(m.dims.n_layers, with_output=has_output(m)), permute=m.family.permute_qk)
    qtypes = [gguf_qtype(gguf, j.t, j.info.shape, outtype) for j in jobs]
    writer = gguf.GGUFWriter(path=None, arch=m.family.gguf_arch)
    gguf_metadata(gguf, writer, m, outtype, name)
    extra = extra_tensors(m)  # rope_freqs (llama3 rope scaling): first, as the converter writes it
    for ename, etensor in extra:
        writer.add_tensor_info(ename, tuple(etensor.shape), np.float32, etensor.numel() * 4,
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    sizes = []
    for j, q in zip(jobs, qtypes):
        nb = gguf_nbytes(gguf, q, j.info.shape)
        sizes.append(nb)
        writer.add_tensor_info(j.t.gguf, j.info.shape, np.float32, nb, raw_dtype=q)
    kv = writer.kv_data[0].get("tokenizer.chat_template")
    return {"writer": writer, "jobs": jobs, "qtypes": qtypes, "sizes": sizes, "extra": extra,
            "bytes": sum(sizes) + sum(e.numel() * 4 for _, e in extra), "tensors": len(jobs) + len(extra),
            "chat_template": kv.value if kv is not None else None}


def _write_gguf(gguf, m: ModelFolder, plan: dict, path: Path, output: Path) -> str:
    """Stream the planned GGUF into `path`; return its sha256."""
    from .stream import HashingWriter

    writer = plan["writer"]
    align = writer.data_alignment
    with open(path, "wb") as raw:
        f = HashingWriter(raw)
        # GGUFWriter writes the header, metadata and tensor infos into our (hashing) file; it
        # never holds a tensor: the data is written below, one block of rows at a time.
        begin_gguf_file(gguf, writer, f, output)
        conv = Converter(gguf)
        try:
            for _, etensor in plan["extra"]:
                f.write(memoryview(etensor.numpy()).cast("B"))
                writer.write_padding(f, etensor.numel() * 4, align)
            for blk, q, nb in zip(tensor_stream(m, plan["jobs"]), plan["qtypes"], plan["sizes"], strict=True):
                job, tensor = blk.key, blk.data
                start = f.tell()
                conv.write(f, q, tensor, job.source)
                if f.tell() - start != nb:
                    raise RuntimeError(f"{job.t.gguf}: wrote {f.tell() - start} bytes, planned {nb}")
                writer.write_padding(f, nb, align)
        finally:
            conv.close()
            f.close()
    return f.hexdigest
