"""Import Meta's original LLaMA weights (consolidated.NN.pth + params.json + tokenizer.model) as a
Hugging Face folder, streaming, so the LoRA merge works on them unchanged.

Each shard is opened with `torch.load(weights_only=True, map_location="meta")`: no pickle code runs,
no tensor data is read, and torch reports where each storage's bytes lie in the file. The bytes are
then read block by block with `preadv` into reused buffers (a memory map would count every touched
page of a 13 GB shard in the process's RSS). For every Hugging Face tensor the shards'
slices are concatenated along the split dimension of `llamaforge.model.meta_params`, q/k rows are put back in
Hugging Face order, and the blocks go straight into safetensors shards (ShardedSafetensorsWriter).
Memory stays at a few blocks whatever the model size.

The inverse of `llamaforge.export.export_pth`: importing an export gives back the same tensors, byte
for byte, with the same names and dtypes. What params.json cannot hold is chosen as documented in
`model.meta_params.default_max_positions` (context length) and taken from tokenizer.model (bos/eos/pad ids).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import atomic_dir, write_json
from ..files.guard import guard_output, json_of_kind, register_output_kind
from ..files.hashing import hash_files
from ..files.reading import require_dir
from ..formats.dtypes import TensorInfo, parse_size, pread_into
from ..formats.pickles import torch_load_error
from ..formats.safetensors import ShardedSafetensorsWriter, plan_shards
from ..formats.stream import COPY_BLOCK_ELEMS, BlockReader, Read, block_rows, row_ranges
from ..model import DERIVED_META, EMBED, by_meta, config_from_dims, dims_from_params, hf_order, permute_into
from ..tokenizer import is_tiktoken_model, load_proto, special_ids, tokenizer_folder_model, write_hf_tokenizer

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# an imported folder is llamaforge's by its manifest, llamaforge.json {"llamaforge": "import_pth", ...}
register_output_kind("import", "imported model folder", lambda p: json_of_kind("import_pth")(p / "llamaforge.json"),
                     folder=True)


class PthFile:
    """Lazy reader of one torch.save checkpoint: names, dtypes and shapes from the pickle (read with
    weights_only=True onto the meta device, which also tells where each storage's bytes lie in the
    file), bytes read on demand with `formats.pread_into`.

    Not `formats.torch_load`: it maps the file onto the CPU, and the offsets come only with the meta device.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fix = "the file is damaged or incomplete: download it again (check it against checklist.chk / SHA256)"
        try:
            sd = torch.load(self.path, map_location="meta", weights_only=True)
        except Exception as e:  # noqa: BLE001 - zip errors for damage, UnpicklingError for disallowed globals
            raise torch_load_error(e, self.path, "Meta checkpoint") from None
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LlamaforgeError("not a state dict of tensors", self.path, "point to Meta's consolidated.NN.pth files")
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        size = self.path.stat().st_size
        for name, t in sd.items():
            offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
            if offset is None or not t.is_contiguous():
                raise LlamaforgeError(f"tensor {name} is not stored contiguously in a zip record", self.path,
                                      "re-save the checkpoint with a current torch.save")
            info = TensorInfo(name, t.dtype, tuple(t.shape))
            start = int(offset) + t.storage_offset() * t.element_size()
            if start + info.nbytes > size:
                raise LlamaforgeError(f"tensor {name} lies beyond the end of the file", self.path, fix)
            self._entries[name] = (info, start)
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def read_flat(self, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
        """Elements [first, first+count) of `name`, flattened, read into the uint8 buffer `buf`."""
        info, start = self._entries[name]
        view = buf[: count * info.dtype.itemsize]
        pread_into(self._fd, view, start + first * info.dtype.itemsize, self.path, name)
        return view.view(info.dtype)

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_flat(name, 0, info.numel, torch.empty(info.nbytes, dtype=torch.uint8)).view(info.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def find_tokenizer(folder: Path, tokenizer: str | os.PathLike | None = None) -> Path:
    """tokenizer.model: given (the file or its folder), in the folder, or one level up (Meta's
    download puts it beside 7B/)."""
    if tokenizer is not None:
        return tokenizer_folder_model(tokenizer)
    for p in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if p.is_file():
            return p
    raise LlamaforgeError(
        "no tokenizer.model in the Meta folder or beside it", folder,
        "copy LLaMA's tokenizer.model into the folder (or pass --tokenizer)",
    )


def meta_shards(folder: Path) -> list[Path]:
    found = {}
    for p in folder.glob("consolidated.*.pth"):
        m = _SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise LlamaforgeError("no consolidated.NN.pth in the folder", folder,
                              "point to Meta's model folder (consolidated.00.pth, params.json)")
    n = len(found)
    missing = [i for i in range(n) if i not in found]
    if missing or max(found) != n - 1:
        raise LlamaforgeError(
            f"shards {sorted(found)} are not consolidated.00 .. {n - 1:02d}: consolidated.{missing[0] if missing else n:02d}.pth "
            "is missing", folder, "the download is incomplete: fetch every shard")
    return [found[i] for i in range(n)]


def _read_params(folder: Path) -> dict:
    from ..files.hashing import metadata_bytes
    from ..files.reading import in_folder

    p = in_folder(folder, "params.json", "Meta folder",
                  "copy params.json from Meta's release (it sits beside consolidated.00.pth)")
    try:
        params = json.loads(metadata_bytes(p).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LlamaforgeError(f"params.json is not JSON ({getattr(e, 'msg', 'nested too deeply')})", p,
                              "restore params.json from Meta's release") from None
    if not isinstance(params, dict):
        raise LlamaforgeError("params.json is not an object", p, "restore params.json from Meta's release")
    return params


def import_pth(input: str | os.PathLike, output: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
               max_shard_size: str | int = D.MAX_SHARD_SIZE, max_positions: int | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """Convert a Meta folder into a Hugging Face folder at `output` (atomically). Returns the manifest."""
    guard_output(output, "import", [("Meta model folder", input), ("tokenizer", tokenizer)])
    folder = require_dir(input, "Meta model folder")
    params = _read_params(folder)
    paths = meta_shards(folder)
    tok_path = find_tokenizer(folder, tokenizer)
    tiktoken = is_tiktoken_model(tok_path)  # Llama-3: Meta's tokenizer.model is tiktoken's, not SentencePiece's
    proto = None if tiktoken else load_proto(tok_path, "tokenizer.model")
    shard_bytes = parse_size(max_shard_size)
    shards = [PthFile(p) for p in paths]
    try:
        n = len(shards)
        first = shards[0]
        if EMBED.meta not in first:
            raise LlamaforgeError(f"no {EMBED.meta} in the checkpoint", paths[0], "point to a LLaMA checkpoint")
        dims = dims_from_params(params, first.info(EMBED.meta).shape[0], folder / "params.json", max_positions)
        table = by_meta(dims.n_layers)
        keys0 = set(first.keys())
        for p, s in zip(paths, shards):
            unknown = sorted(k for k in s.keys() if k not in table and not DERIVED_META.match(k))
            if unknown:
                raise LlamaforgeError(f"tensor {unknown[0]} is not part of LLaMA ({len(unknown)} unknown)", p,
                                      f"check n_layers in params.json ({dims.n_layers}) and that this is a LLaMA checkpoint")
            if set(s.keys()) != keys0:
                diff = sorted(set(s.keys()) ^ keys0)
                raise LlamaforgeError(f"the shards hold different tensors ({diff[0]} ...)", p,
                                      "all consolidated.NN.pth must come from the same release")
        # Plan every HF tensor from the shards' shapes; check them against params.json.
        plan = []
        for t in hf_order(dims.n_layers):
            if t.meta not in first:
                raise LlamaforgeError(f"the checkpoint has no {t.meta}", paths[0],
                                      "the checkpoint is incomplete or params.json belongs to another model")
            shapes = [s.info(t.meta).shape for s in shards]
            dtypes = {s.info(t.meta).dtype for s in shards}
            if len(dtypes) != 1:
                raise LlamaforgeError(f"{t.meta} has different dtypes across shards", folder, "use one release")
            if t.split_dim is None or n == 1:
                shape = tuple(shapes[0])
                if any(tuple(sh) != shape for sh in shapes):
                    raise LlamaforgeError(f"{t.meta} differs in shape across shards", folder, "use one release")
            else:
                d = t.split_dim
                shape = list(shapes[0])
                shape[d] = sum(sh[d] for sh in shapes)
                shape = tuple(shape)
                if any(tuple(sh[:d]) + tuple(sh[d + 1:]) != tuple(shapes[0][:d]) + tuple(shapes[0][d + 1:])
                       for sh in shapes):
                    raise LlamaforgeError(f"{t.meta} shards disagree outside dim {d}", folder, "use one release")
                heads = dims.heads_of(t)
                if heads is not None and any(sh[0] % dims.hd for sh in shapes):
                    raise LlamaforgeError(f"{t.meta} is split inside a head", paths[0], "use Meta's own shards")
            want = dims.shape_of(t)
            d = t.split_dim
            if (shape != want and d is not None and len(shape) == len(want) and shape[d] and want[d] % shape[d] == 0
                    and all(a == b for i, (a, b) in enumerate(zip(shape, want)) if i != d)):
                total = n * want[d] // shape[d]
                raise LlamaforgeError(
                    f"{t.meta} holds {shape[d]} of the {want[d]} rows/columns params.json implies: the checkpoint "
                    f"is split into {total} shards but only {n} consolidated.NN.pth found "
                    f"(consolidated.{n:02d}.pth is missing)", folder, "the download is incomplete: fetch every shard")
            if shape != want:
                raise LlamaforgeError(f"{t.meta} has shape {list(shape)} but params.json implies {list(want)}",
                                      folder / "params.json", "use the params.json of this checkpoint")
            plan.append((t, TensorInfo(t.hf, dtypes.pop(), shape)))
        n_pieces = len(proto.pieces) if proto is not None else dims.vocab  # tiktoken: checked when converted
        if n_pieces != dims.vocab:
            raise LlamaforgeError(f"tokenizer.model has {n_pieces} pieces but the embeddings have {dims.vocab} rows",
                                  tok_path, "use the tokenizer.model released with these weights")
        llama3_tokenizer = None
        if tiktoken:  # converted (and checked against the embedding rows) before any weight is read
            from ..tokenizer import llama3_tokenizer_json

            llama3_tokenizer = llama3_tokenizer_json(tok_path, dims.vocab)
        dtype = plan[0][1].dtype
        dtype_name = str(dtype).removeprefix("torch.")
        total = sum(info.nbytes for _, info in plan)
        echo(f"importing {folder}: {n} shard(s), {total / 1e9:.2f} GB {dtype_name}, {dims.n_layers} layers, "
             f"hidden {dims.hidden}, FFN {dims.intermediate}, heads {dims.n_heads}/{dims.n_kv_heads}, "
             f"vocabulary {dims.vocab}, context {dims.max_positions}")

        with atomic_dir(output, need_bytes=total) as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan_shards([info for _, info in plan], shard_bytes))
            try:
                _stream(shards, plan, dims, n, writer)
            except BaseException:
                writer.abort()
                raise
            outputs = writer.close()
            if tiktoken:
                _write_llama3_files(tmp, params, dims, dtype_name, llama3_tokenizer)
            else:
                ids = special_ids(proto)
                pad = ids.get("pad")
                cfg = config_from_dims(dims, dtype_name, ids.get("bos"), ids.get("eos"), pad)
                write_json(tmp / "config.json", cfg)
                write_json(tmp / "generation_config.json",
                           {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None})
                # a pad piece the trainer spec does not name ([PAD] of Chinese-Alpaca) is an added special token
                pads = [proto.pieces[pad].piece] if pad is not None and pad != proto.trainer_spec.pad_id else []
                write_hf_tokenizer(proto, tmp, pads, model_bytes=tok_path.read_bytes(),
                                   model_max_length=dims.max_positions)
            outputs = hash_files(tmp, outputs)
            manifest = {
                "llamaforge": "import_pth",
                "source": {"path": os.fspath(folder), "shards": [p.name for p in paths], "params": params,
                           "tokenizer": os.fspath(tok_path)},
                "config": {"max_position_embeddings": dims.max_positions, "torch_dtype": dtype_name},
                "outputs_sha256": outputs,
            }
            write_json(tmp / "llamaforge.json", manifest)
        echo(f"wrote {output}: {len(writer.names)} safetensors file(s)")
        return manifest
    finally:
        for s in shards:
            s.close()


def _write_llama3_files(tmp: Path, params: dict, dims, dtype_name: str, tokenizer_json: dict) -> None:
    """config.json (llama3 rope scaling when params.json says use_scaled_rope), generation_config.json
    and the tokenizer (tokenizer.json from Meta's tiktoken tokenizer.model) of a
    Llama-3.x import, as transformers' convert_llama_weights_to_hf writes them."""
    from ..tokenizer import LLAMA3_SPECIAL_TOKENS, write_llama3_tokenizer

    ranks = dims.vocab - len(LLAMA3_SPECIAL_TOKENS)
    bos, eos = ranks, ranks + 1  # <|begin_of_text|>, <|end_of_text|>
    cfg = config_from_dims(dims, dtype_name, bos, eos, None)
    eos_ids = eos
    if params.get("use_scaled_rope"):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
        eos_ids = [eos, ranks + 8, ranks + 9]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    write_json(tmp / "config.json", cfg)
    write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos_ids})
    # Meta's tiktoken tokenizer.model is not copied: in a Hugging Face folder that name means SentencePiece
    write_llama3_tokenizer(tokenizer_json, tmp, dims.max_positions)


def _reads(shards: list[PthFile], plan, dims, n: int):
    """The blocks of every planned HF tensor, rows concatenated from the shards (q/k rows back in
    HF order, dim-1 splits gathered side by side); runs in the stream's reader thread."""
    scratch: list[torch.Tensor] = []  # the reader thread's own, one per shard, grown on demand

    def scratch_for(k: int, nbytes: int) -> torch.Tensor:
        while len(scratch) <= k:
            scratch.append(torch.empty(0, dtype=torch.uint8))
        if scratch[k].numel() < nbytes:
            scratch[k] = torch.empty(nbytes, dtype=torch.uint8)
        return scratch[k]

    for t, info in plan:
        item = info.dtype.itemsize
        heads = dims.heads_of(t)
        if t.split_dim is None or n == 1 or t.split_dim == 0:
            parts = [shards[0]] if (t.split_dim is None or n == 1) else shards
            if t.split_dim is None and n > 1:
                ref = shards[0].get(t.meta)
                for s in shards[1:]:
                    if not torch.equal(s.get(t.meta).view(torch.uint8), ref.view(torch.uint8)):
                        raise LlamaforgeError(f"{t.meta} differs between shards", s.path, "use one release")
            for s in parts:
                shape = s.info(t.meta).shape
                rows, width = (1, shape[0]) if len(shape) == 1 else (shape[0], info.numel // info.shape[0])
                # whole heads per block: the permutation is per head
                step = 1 if len(shape) == 1 else block_rows(width, dims.hd if heads is not None else 1, COPY_BLOCK_ELEMS)
                for a, b in row_ranges(rows, step):
                    need = (b - a) * width * item

                    def fill(buf, s=s, a=a, b=b, width=width, need=need, t=t, info=info, heads=heads):
                        if heads is None:
                            return s.read_flat(t.meta, a * width, (b - a) * width, buf)
                        x = s.read_flat(t.meta, a * width, (b - a) * width, scratch_for(0, need)).view(b - a, width)
                        out = buf[:need].view(info.dtype).view(b - a, width)
                        permute_into(out, x, (b - a) // dims.hd, to_meta=False)
                        return out

                    yield Read(t.hf, need, fill)
            continue
        # split on dim 1 (tok_embeddings, wo, w2): each block of rows is the shards' columns side by side
        rows, cols = info.shape
        widths = [s.info(t.meta).shape[1] for s in shards]
        for a, b in row_ranges(rows, block_rows(cols, values=COPY_BLOCK_ELEMS)):
            def gather(buf, a=a, b=b, t=t, info=info, item=item, cols=cols, widths=widths):
                out = buf[:(b - a) * cols * item].view(info.dtype).view(b - a, cols)
                c = 0
                for k, (s, w) in enumerate(zip(shards, widths)):
                    src = scratch_for(k, (b - a) * w * item)
                    out[:, c:c + w].copy_(s.read_flat(t.meta, a * w, (b - a) * w, src).view(b - a, w))
                    c += w
                return out

            yield Read(t.hf, (b - a) * cols * item, gather)


def _stream(shards: list[PthFile], plan, dims, n: int, writer: ShardedSafetensorsWriter) -> None:
    """Write every planned HF tensor, block by block, read ahead in the stream's reader thread."""
    reader = BlockReader(_reads(shards, plan, dims, n), COPY_BLOCK_ELEMS * 2, depth=3, name="llamaforge-import-reader")
    for blk in reader:
        writer.write_block(blk.key, blk.data)
        reader.done(blk)
