"""The Meta export: consolidated.NN.pth (all N shards in one pass over the tensors, each tensor read
once and its slices sent to every shard's file) + params.json + tokenizer.model + SHA256SUMS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LlamaforgeError
from ..files.atomic import atomic_dir
from ..files.checksums import SUM_LINE, SUMS, sums_text
from ..files.guard import guard_output, register_output_kind, sums_header
from ..model import (
    EMBED,
    ModelFolder,
    TokenizerKind,
    check_shardable,
    default_num_shards,
    meta_order,
    params_from_dims,
)
from .source import _shard_pieces, open_model, plan_reads, tensor_stream

if TYPE_CHECKING:  # torch, the weight files and the stream only where tensors are read or written

    from ..formats.dtypes import TensorInfo


SUMS_MARK = sums_header("export_pth").rstrip("\n")  # the first line of the SHA256SUMS export_pth writes


def _sums_kind(folder: Path) -> str | None:
    """'export_pth' when the folder's SHA256SUMS is the one a Meta export writes: the header line
    `# llamaforge export_pth` (or none: earlier llamaforge versions), then only '<sha256>  <name>'
    lines that list exactly the folder's other files (params.json, tokenizer.model and the
    consolidated.NN.pth files). A header alone is no mark: a folder holding anything else is not ours."""
    try:
        lines = (folder / SUMS).read_text(encoding="utf-8").splitlines()
        present = {p.name for p in folder.iterdir()} - {SUMS}
    except (OSError, UnicodeDecodeError):
        return None
    if lines and lines[0] == SUMS_MARK:
        lines = lines[1:]
    if not lines or not all(SUM_LINE.fullmatch(line) for line in lines):
        return None
    listed = {line[66:] for line in lines}
    ok = listed == present and {"params.json", "consolidated.00.pth"} <= listed and all(
        n in ("params.json", "tokenizer.model") or re.fullmatch(r"consolidated\.\d\d\.pth", n) for n in listed)
    return "export_pth" if ok else None


register_output_kind("pth", "Meta export folder", lambda p: _sums_kind(p) == "export_pth", folder=True)


def export_pth(model: str | os.PathLike, output: str | os.PathLike, num_shards: int | None = None,
               echo: Callable[[str], None] = print) -> dict[str, str]:
    """Write `output/` = consolidated.NN.pth + params.json + tokenizer.model + SHA256SUMS, atomically.

    All shards are written in one pass over the tensors: each tensor is read once and its slices go
    to every shard's file. Returns sha256 by file name.
    """
    from ..formats.dtypes import TensorInfo
    from ..formats.stream import HashingWriter
    from ..formats.torch_zip import TorchZipWriter

    guard_output(output, "pth", [("model folder", model)])
    family = ModelFolder(model).family  # refused by its config.json alone: before any tokenizer or tensor check
    if not family.meta:
        raise LlamaforgeError(
            f"{family.architecture} has no Meta consolidated.NN.pth format (Meta's is LLaMA's alone)",
            Path(model) / "config.json", "export it as Hugging Face (hf) or GGUF (gguf-f16, gguf-q8_0) instead")
    m = open_model(model)
    try:
        dims = m.dims
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
            from ..tokenizer import tiktoken_model

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
