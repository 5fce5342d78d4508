"""The GGUF export: F16, BF16 and Q8_0 written here, block of rows by block of rows; the llama.cpp
types by llama.cpp's own quantizer from the F16 (written first, or given with --from-f16, which
then reads no tensor of the model and imports no torch); the `.sha256` and the Modelfile beside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LlamaforgeError
from ..files.atomic import atomic_files
from ..files.checksums import sums_text
from ..files.guard import guard_output
from ..files.hashing import sha256_file
from ..model import (
    ModelFolder,
)
from .gguf_check import check_f16
from .gguf_meta import (
    GGUF_TYPES,
    extra_tensors,
    gguf_metadata,
    gguf_nbytes,
    gguf_qtype,
    load_gguf,
)
from .gguf_write import Converter, begin_gguf_file
from .modelfile import check_gguf_name, check_parameters, modelfile_path  # and the Modelfile's mark
from .source import describe_model, has_output, open_model, plan_reads, raw_bytes_suffice, tensor_stream

if TYPE_CHECKING:  # torch, the weight files and the stream only where tensors are read or written

    pass


def export_gguf(model: str | os.PathLike, output: str | os.PathLike, outtype: str = "f16",
                name: str | None = None, echo: Callable[[str], None] = print, modelfile: dict | None = None,
                threads: int = 0, from_f16: str | os.PathLike | None = None,
                imatrix: str | os.PathLike | None = None) -> str:
    """Write the GGUF file `output` (+ `output.sha256`, + `{stem}.Modelfile` for Ollama unless
    modelfile is None) atomically; return its sha256.

    f16, bf16 and q8_0 are written here; the llama.cpp types (q4_0 ... q6_k, quantize.LLAMA_CPP_TYPES)
    are made by llama.cpp's own quantizer from the F16 GGUF written here first (a temporary file).
    `modelfile`: the generation parameters for the Modelfile (Ollama's names: temperature, top_k,
    top_p, repeat_penalty, num_predict). `from_f16`: quantize this F16 GGUF of `model`, written by
    llamaforge before (the workflow's exports/{model}/{model}-f16.gguf), instead of writing one.
    `imatrix`: an importance matrix (scripts/imatrix.py) the quantizer uses: llama.cpp's own
    llama-quantize --imatrix then makes the file (export.tools)."""
    from .quantize import LLAMA_CPP_TYPES, check_imatrix_need, load_llama_cpp

    quantized = outtype in LLAMA_CPP_TYPES
    if outtype not in GGUF_TYPES and not quantized:
        raise LlamaforgeError(f"unknown --outtype {outtype!r}", None,
                              f"use one of {', '.join(GGUF_TYPES + LLAMA_CPP_TYPES)}")
    if imatrix is not None and not quantized:
        raise LlamaforgeError(f"--imatrix is for llama.cpp's quantized types, not {outtype}", imatrix,
                              f"drop --imatrix, or ask for one of {', '.join(LLAMA_CPP_TYPES)}")
    if quantized:
        check_imatrix_need(outtype, imatrix)
        if imatrix is None:  # (with one, llama.cpp's own llama-quantize quantizes: no binding needed)
            load_llama_cpp(outtype)  # before anything is read: without it, one line saying what to install
        else:
            from ..files.reading import require_regular_file
            from .tools import tool

            tool("llama-quantize")
            require_regular_file(Path(imatrix), "the importance matrix",
                                 f"make it first: scripts/imatrix.py --model {model} --text FILE --output {imatrix}")
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
    inputs = [("model folder", model), ("F16 GGUF", from_f16), ("importance matrix", imatrix)]
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
                from ..files.atomic import scratch_file
                from .quantize import fallbacks, quantize_gguf, tensor_types, type_summary

                if from_f16 is not None:
                    quantize_gguf(from_f16, tmp_gguf, outtype, threads, imatrix)
                else:
                    with scratch_file(output, output.stem + "-f16.gguf") as f16:
                        _write_gguf(gguf, m, plan, f16, output)
                        quantize_gguf(f16, tmp_gguf, outtype, threads, imatrix)
                digest = sha256_file(tmp_gguf)
                types = tensor_types(tmp_gguf)  # its header parsed once
                echo(f"llama.cpp quantized it to {outtype}{' with the importance matrix' if imatrix else ''}: "
                     f"{type_summary(tmp_gguf, types)}")
                fell = fallbacks(tmp_gguf, outtype, types)
                if outtype.endswith(("_k", "_k_s", "_k_m", "_k_l")) and not fell:
                    echo("no tensor fell back: every matrix has rows that are a multiple of 256")
                if fell:
                    echo(f"{len(fell)} tensor(s) fell back to another type (rows not a multiple of 256): "
                         + ", ".join(f"{n} {t}" for n, t in fell[:12]) + (" ..." if len(fell) > 12 else ""))
            else:
                digest = _write_gguf(gguf, m, plan, tmp_gguf, output)
            tmp_sums.write_text(sums_text({output.name: digest}), encoding="utf-8")
            if mfile is not None:
                from .modelfile import modelfile_text

                template = plan["chat_template"]
                tmps[2].write_text(modelfile_text(output.name, template, modelfile), encoding="utf-8")
        from ..files.hashing import remember_sha256

        remember_sha256(output, digest)  # hashed as written: --from-f16 of it then reads it once, not twice
        echo(f"wrote {output} ({output.stat().st_size / 1e9:.2f} GB), {sums.name}"
             + (f" and {mfile.name}" if mfile is not None else ""))
        return digest
    finally:
        m.close()


def write_f16(model: str | os.PathLike, path: str | os.PathLike, output: str | os.PathLike) -> str:
    """Write the F16 GGUF of `model` into `path` (a scratch file of the job making `output`, e.g. an
    importance matrix); return its sha256."""
    gguf = load_gguf()
    m = open_model(model)
    try:
        plan = _plan_gguf(gguf, m, "f16", m.folder.name)
        return _write_gguf(gguf, m, plan, Path(path), Path(output))
    finally:
        m.close()


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


def _raw_stream(gguf, plan: dict) -> bool:
    """Whether the GGUF's tensors go through the stream as raw bytes, without torch: each is written
    as stored, or is float16 that becomes float32 (norms) or Q8_0, and none has a value offset. A
    float32 or bfloat16 model written as F16 converts its values in torch."""
    Q = gguf.GGMLQuantizationType
    as_stored = {Q.F16: "F16", Q.F32: "F32", Q.BF16: "BF16"}
    return raw_bytes_suffice(plan["jobs"]) and all(
        as_stored.get(q) == j.info.code or (j.info.code == "F16" and q in (Q.F32, Q.Q8_0))
        for j, q in zip(plan["jobs"], plan["qtypes"]))


def _write_gguf(gguf, m: ModelFolder, plan: dict, path: Path, output: Path) -> str:
    """Stream the planned GGUF into `path`; return its sha256."""
    from ..formats.stream import HashingWriter

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
            raw = _raw_stream(gguf, plan)
            stream = tensor_stream(m, plan["jobs"], raw=raw)
            for blk, q, nb in zip(stream, plan["qtypes"], plan["sizes"], strict=True):
                job, tensor = blk.key, blk.data
                start = f.tell()
                conv.write(f, q, tensor, job.source, job.info.code)
                if f.tell() - start != nb:
                    raise RuntimeError(f"{job.t.gguf}: wrote {f.tell() - start} bytes, planned {nb}")
                writer.write_padding(f, nb, align)
        finally:
            conv.close()
            f.close()
    return f.hexdigest
