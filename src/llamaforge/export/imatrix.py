"""The importance matrix of a model (llama.cpp's `llama-imatrix`: per weight matrix, the sum of
squared activations of each input column over a calibration text), in llama.cpp's GGUF imatrix
format, computed by the tool itself on the model's F16 GGUF.

Beside FILE.imatrix.gguf, FILE.imatrix.gguf.json records what it was made of: the calibration
text's sha256 (checked by the quality table, which refuses to judge on the calibration text), the
F16's sha256, the chunks and context, and the llama-cpp-python version of the tool. The GGUF itself
is exactly llama-imatrix's output (its imatrix.datasets key names the text as given).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import LlamaforgeError
from ..files.guard import json_of_kind, register_output_kind

IMATRIX_KIND = "imatrix"
IMATRIX_CTX = 512  # llama-imatrix's own default context (chunk size)


def sidecar_path(imatrix: str | os.PathLike) -> Path:
    """FILE.imatrix.gguf.json, the record beside an importance matrix."""
    p = Path(imatrix)
    return p.with_name(p.name + ".json")


register_output_kind(IMATRIX_KIND, "importance matrix (llama-imatrix GGUF)",
                     lambda p: json_of_kind(IMATRIX_KIND)(sidecar_path(p)))
register_output_kind("imatrix_record", "importance matrix record", json_of_kind(IMATRIX_KIND))


def read_record(imatrix: str | os.PathLike) -> dict:
    """The record beside an importance matrix llamaforge made (one line when it has none)."""
    side = sidecar_path(imatrix)
    data = json_of_kind(IMATRIX_KIND)(side) and json.loads(side.read_text(encoding="utf-8"))
    if not data:
        raise LlamaforgeError(f"the importance matrix has no record {side.name} beside it (the calibration text's "
                              "sha256)", imatrix, "make it with scripts/imatrix.py")
    if not isinstance(data, dict) or not isinstance(data.get("text_sha256"), str) or "text" not in data:
        raise LlamaforgeError(f"the importance matrix's record {side.name} lacks the calibration text's sha256 or "
                              "path", imatrix, "make the matrix again with scripts/imatrix.py")
    return data


def imatrix_args(f16: str | os.PathLike, text: str | os.PathLike, output: str | os.PathLike,
                 chunks: int | None, ctx: int, threads: int) -> list[str]:
    """llama-imatrix's arguments: the F16, the text, the GGUF output, chunks, context, threads."""
    args = ["-m", f16, "-f", text, "-o", output, "--output-format", "gguf", "-c", str(ctx), "--no-ppl"]
    args += ["--chunks", str(chunks)] if chunks else []
    args += ["-t", str(threads)] if threads else []
    return [os.fspath(a) for a in args]


def make_imatrix(model: str | os.PathLike, text: str | os.PathLike, output: str | os.PathLike,
                 chunks: int | None = None, from_f16: str | os.PathLike | None = None, ctx: int = IMATRIX_CTX,
                 threads: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Write `output` (llama-imatrix's GGUF of `model`'s F16 on `text`) and its record, atomically
    together; return the record. The F16 is `from_f16` (llamaforge's F16 export of the model,
    checked) or one written here first (a temporary file)."""
    from ..files.atomic import atomic_files, scratch_file
    from ..files.guard import guard_output
    from ..files.hashing import sha256_cached, sha256_file
    from ..files.reading import require_regular_file
    from .gguf import write_f16
    from .gguf_check import check_f16
    from .gguf_meta import load_gguf
    from .source import describe_model
    from .tools import llama_cpp_version, run_tool, tool

    output = Path(output)
    if not output.name.endswith(".gguf"):
        raise LlamaforgeError("the importance matrix is written in llama.cpp's GGUF format", output,
                              "give a file name ending in .imatrix.gguf")
    text = require_regular_file(text, "the calibration text", "give a UTF-8 text file (--text)")
    raw = text.read_bytes()
    try:
        if not raw.decode("utf-8").strip():
            raise LlamaforgeError("the calibration text is empty", text, "give a text of a few thousand tokens")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"the calibration text is not UTF-8 (byte {e.start})", text,
                              "save it as UTF-8") from None
    tool("llama-imatrix")  # before any work: one line saying how to build it
    inputs = [("model folder", model), ("calibration text", text), ("F16 GGUF", from_f16)]
    guard_output(output, IMATRIX_KIND, inputs)
    guard_output(sidecar_path(output), "imatrix_record", inputs)
    gguf = load_gguf()
    m = describe_model(model)
    try:
        if from_f16 is not None:
            check_f16(gguf, Path(from_f16), m)
    finally:
        m.close()
    record = {"llamaforge": IMATRIX_KIND, "text": os.fspath(text), "text_sha256": sha256_file(text),
              "text_bytes": len(raw), "chunks": chunks, "ctx": ctx, "llama-cpp-python": llama_cpp_version()}
    with atomic_files([output, sidecar_path(output)]) as (tmp, tmp_record):
        if from_f16 is not None:
            record["f16_sha256"] = sha256_cached(from_f16)
            run_tool("llama-imatrix", imatrix_args(from_f16, text, tmp, chunks, ctx, threads),
                     "computing the importance matrix", text, _fix(ctx), echo)
        else:
            with scratch_file(output, output.stem + "-f16.gguf") as f16:
                record["f16_sha256"] = write_f16(model, f16, output)
                run_tool("llama-imatrix", imatrix_args(f16, text, tmp, chunks, ctx, threads),
                         "computing the importance matrix", text, _fix(ctx), echo)
        record.update(_summary(gguf, tmp))
        tmp_record.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    echo(f"wrote {output}: {record['entries']} matrices over {record['chunks_count']} chunks of {ctx} tokens "
         f"(calibration text sha256 {record['text_sha256'][:16]}...) and {sidecar_path(output).name}")
    return record


def _fix(ctx: int) -> str:
    return (f"give a longer calibration text (at least {2 * ctx} tokens: two chunks of {ctx}), or fewer --chunks; "
            "check that the model loads in llama.cpp")


def _summary(gguf, path: Path) -> dict:
    """entries and chunks_count of a llama-imatrix GGUF."""
    r = gguf.GGUFReader(path)
    f = r.fields.get("imatrix.chunk_count")
    return {"entries": sum(1 for t in r.tensors if t.name.endswith(".in_sum2")),
            "chunks_count": int(f.parts[-1][0]) if f is not None else None}
