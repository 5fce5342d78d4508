"""Streaming merge of ordered LoRA adapters into base weights.

For each tensor of the base, in order: start from the base tensor, or from the full tensor of the
last adapter that stores one (modules_to_save, Chinese embed_tokens/lm_head), apply the low-rank
updates of the adapters that follow it, in float32, cast to the output dtype and write it. The
tensors flow through in blocks of rows: only a few blocks, the current tensor's adapter factors
and a float32 scratch block are in memory at any time, and reading, arithmetic, writing and
hashing overlap in their own threads.

Everything that can be checked without touching the weights (keys, shapes, vocabulary sizes along
the adapter list, the tokenizer) is checked before the first byte is written.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from . import defaults as D
from .errors import LlamaforgeError
from .formats import (
    ModelSource,
    SafetensorsFile,
    ShardedSafetensorsWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    torch_dtype,
)
from .fsutil import (
    atomic_dir, copy_file, guard_output, hash_files, require_dir, sha256_cached, write_json,
)
from .lora import Adapter, Factors, LoraUpdate, apply_factors, load_factors, open_adapter
from .model import EMBED_HF, LM_HEAD_HF, ModelFolder, hf_tensor_order
from .stream import BLOCK_ELEMS, BlockReader, Read, Stage, block_rows, row_ranges
from .tokenizer import check_tokenizer, has_tokenizer, ships_padding, tokenizer_files

log = logging.getLogger(__name__)

VOCAB_EXPLAINED = (
    "LLaMA's vocabulary has 32000 tokens, Chinese-LLaMA's 49953 and Chinese-Alpaca's 49954 (+[PAD]); "
    "the rows for the added tokens come only from an adapter that stores full embed_tokens and lm_head "
    "(Chinese-LLaMA-Plus-LoRA, then Chinese-Alpaca-Plus-LoRA)"
)


@dataclass
class TensorPlan:
    name: str
    out: TensorInfo
    start: tuple[int, str] | None  # (adapter index, adapter tensor) of the last full replacement, or None
    updates: list[tuple[int, LoraUpdate]] = field(default_factory=list)
    from_name: str = ""  # base tensor to start from when start is None (lm_head of a tied model: embed)

    @property
    def changed(self) -> bool:
        return self.start is not None or bool(self.updates)


def _delta_shape(ad: Adapter, up: LoraUpdate) -> tuple[int, int]:
    a, b = ad.info(up.A).shape, ad.info(up.B).shape
    if up.embedding:
        return (a[1], b[0])
    return (a[1], b[0]) if up.fan_in_fan_out else (b[0], a[1])


def _resolve_tokenizer(tokenizer, adapters: list[Adapter], base: Path) -> Path:
    if tokenizer is not None:
        folder = require_dir(tokenizer, "tokenizer folder")
    else:
        folder = next((ad.folder for ad in reversed(adapters) if has_tokenizer(ad.folder)), base)
    if not has_tokenizer(folder):
        raise LlamaforgeError(
            "no tokenizer in the tokenizer folder (tokenizer.model or tokenizer.json)", folder,
            "pass --tokenizer (tokenizer: in config.yaml) pointing to a folder with tokenizer.model or tokenizer.json, "
            "e.g. tokenizers/NAME or the base model's folder",
        )
    return folder


def plan_merge(base: ModelSource, adapters: list[Adapter], dtype: torch.dtype, tied: bool) -> list[TensorPlan]:
    """Decide, for every output tensor, where it starts and which updates apply; check shapes and vocab."""
    names = [n for n in base.keys() if not n.endswith("rotary_emb.inv_freq")]
    if tied and LM_HEAD_HF not in base and any(LM_HEAD_HF in ad.full or LM_HEAD_HF in ad.updates for ad in adapters):
        names.append(LM_HEAD_HF)  # an adapter unties the head
    plans = []
    for name in sorted(names, key=hf_tensor_order):
        from_name = EMBED_HF if (name == LM_HEAD_HF and name not in base) else name
        base_info = base.info(from_name)
        if not base_info.dtype.is_floating_point:
            raise LlamaforgeError(
                f"{from_name} is stored as {str(base_info.dtype).removeprefix('torch.')}, not as floating-point "
                "weights", base.folder, "merge into a float16/bfloat16/float32 base (not a quantized or mislabelled one)")
        shape = base_info.shape
        start = None
        updates: list[tuple[int, LoraUpdate]] = []
        for i, ad in enumerate(adapters):
            full = ad.full.get(name)
            if full is not None:
                fshape = ad.info(full).shape
                if len(fshape) != len(shape) or fshape[1:] != shape[1:]:
                    raise LlamaforgeError(
                        f"{full} has shape {list(fshape)} but the model's {name} is {list(shape)}", ad.weights_file,
                        "the adapter was trained for another model size: use the matching base",
                    )
                if name in (EMBED_HF, LM_HEAD_HF):
                    if fshape[0] < shape[0]:
                        raise LlamaforgeError(
                            f"the vocabulary would shrink from {shape[0]} to {fshape[0]} rows of {name} at this adapter",
                            ad.folder,
                            "order the adapters so the vocabulary only grows (e.g. LLaMA-Plus before Alpaca-Plus); "
                            + VOCAB_EXPLAINED,
                        )
                elif fshape != shape:
                    raise LlamaforgeError(f"{full} has shape {list(fshape)} but the model's {name} is {list(shape)}",
                                          ad.weights_file, "use the adapter trained for this base")
                shape = tuple(fshape)
                start = (i, full)
                updates = []  # a full tensor replaces everything before it
            up = ad.updates.get(name)
            if up is not None:
                ds = _delta_shape(ad, up)
                if ds != tuple(shape):
                    hint = (" (the vocabulary at this point has a different size: check the adapter order)"
                            if name in (EMBED_HF, LM_HEAD_HF) else "")
                    raise LlamaforgeError(
                        f"the LoRA update of {name} has shape {list(ds)} but the tensor is {list(shape)}{hint}",
                        ad.weights_file, "use the adapter trained for this base, in the right order",
                    )
                updates.append((i, up))
        src_dtype = ad.info(start[1]).dtype if start else base_info.dtype
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        plans.append(TensorPlan(name, TensorInfo(name, out_dtype, tuple(shape)), start, updates, from_name))
    return plans


_FP16_MAX = 65504.0


def _view_block(f: SafetensorsFile, name: str, first: int, count: int, buf: torch.Tensor):
    return f.view_flat(name, first, count)  # (view, release): the pooled buffer is not needed


def _read_block(src, name: str, first: int, count: int, buf: torch.Tensor) -> torch.Tensor:
    return src.read_flat(name, first, count, buf)


class _Merger:
    """The merge as a consumer of the stream (llamaforge.stream): the reader thread reads blocks of
    rows of each tensor's source (views of the page cache for safetensors), the calling thread
    applies the LoRA factors in float32 (llamaforge.lora) and casts back, a writer stage writes and
    hashes. Torch runs single-threaded here: the three stages are the parallelism.
    """

    def __init__(self, base: ModelSource, adapters: list[Adapter], device: str):
        self.base, self.adapters, self.device = base, adapters, device

    def _source(self, p: TensorPlan):
        if p.start is not None:
            i, tname = p.start
            return self.adapters[i].source, tname
        return self.base, p.from_name

    @staticmethod
    def _rows(p: TensorPlan) -> tuple[int, int]:
        shape = p.out.shape
        if len(shape) >= 2:
            return shape[0], p.out.numel // max(1, shape[0])
        return p.out.numel, 1

    def _reads(self, plans: list[TensorPlan]):
        """The blocks of every tensor, in plan order (runs in the reader thread)."""
        done: list[str] = []
        for p in plans:
            src, tname = self._source(p)
            rows, width = self._rows(p)
            f = src.file_of(tname) if isinstance(src, ModelSource) else src
            item = src.info(tname).dtype.itemsize
            for r0, r1 in row_ranges(rows, block_rows(width)):
                first, count = r0 * width, (r1 - r0) * width
                if isinstance(f, SafetensorsFile):  # no copy: a view of the page cache
                    fill = functools.partial(_view_block, f, tname, first, count)
                else:
                    fill = functools.partial(_read_block, src, tname, first, count)
                yield Read((p, r0, r1), count * item, fill)
            if p.start is None:
                done.append(p.from_name)
                self.base.release(done)  # a pickled base's file closes once all its tensors are read

    def _factors(self, p: TensorPlan) -> list[Factors]:
        return [load_factors(self.adapters[i], up, self.device) for i, up in p.updates]

    def _check(self, p: TensorPlan, x: torch.Tensor) -> None:
        """NaN/Inf in a float32 block, or values the output dtype cannot hold."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        limit = _FP16_MAX if p.out.dtype == torch.float16 else float("inf")
        if not (-limit <= lo and hi <= limit):  # also false for NaN
            self._nonfinite(p)

    def _nonfinite(self, p: TensorPlan) -> None:
        where = self.adapters[p.updates[-1][0]].weights_file if p.updates else (
            self.adapters[p.start[0]].weights_file if p.start else self.base.folder)
        raise LlamaforgeError(
            f"merging produced NaN or Inf in {p.name} ({p.out.dtype})", where,
            "the adapter holds NaN/Inf or values too large for the dtype: check the adapter, or merge with "
            "--dtype float32/bfloat16",
        )

    def run(self, plans: list[TensorPlan], writer: ShardedSafetensorsWriter, progress=None) -> None:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        nbuf = 3
        out_free: queue.Queue = queue.Queue()
        for _ in range(nbuf):
            out_free.put(torch.empty(BLOCK_ELEMS * 4, dtype=torch.uint8))
        scratch = torch.empty(BLOCK_ELEMS, dtype=torch.float32, device=self.device)
        reader = BlockReader(self._reads(plans), BLOCK_ELEMS * 4, depth=nbuf)
        stage = Stage("llamaforge-writer", depth=nbuf)

        def write(name, data, done):
            if progress is not None:
                progress.update(data.numel() * data.element_size())
            writer.write_block(name, data, done)  # hashed behind the write; done() frees the buffer

        try:
            current, factors, width = None, [], 1
            for blk in reader:
                if stage.failure is not None:
                    reader.done(blk)
                    break
                p, r0, r1 = blk.key
                if p is not current:
                    current, factors, (_, width) = p, self._factors(p), self._rows(p)
                    if progress is not None:
                        progress.set_postfix_str(p.name, refresh=False)
                view = blk.data
                n = view.numel()
                same = view.dtype == p.out.dtype
                if not factors and same and not p.changed:  # untouched: bytes pass straight through
                    release = functools.partial(reader.done, blk)
                    stage.submit(functools.partial(write, p.name, view, release), release)
                    continue
                x = scratch[:n] if n <= scratch.numel() else torch.empty(n, dtype=torch.float32, device=self.device)
                x.copy_(view)
                reader.done(blk)
                if factors:
                    apply_factors(x.view(r1 - r0, width), r0, factors)
                if p.changed or not same:
                    self._check(p, x)
                obuf = out_free.get()
                size = n * p.out.dtype.itemsize
                if obuf.numel() < size:
                    obuf = torch.empty(size, dtype=torch.uint8)
                out = obuf[:size].view(p.out.dtype)
                out.copy_(x)
                release = functools.partial(out_free.put, obuf)
                stage.submit(functools.partial(write, p.name, out, release), release)
                del view, x, out
        finally:
            reader.close()
            stage.close(raise_failure=False)
            torch.set_num_threads(prev_threads)
        if stage.failure is not None:
            raise stage.failure


def _copy_tokenizer(folder: Path, out: Path) -> None:
    """The tokenizer's files, byte for byte (tokenizer.json tokenizers, chat template included); a
    tokenizer.model without Hugging Face files gets them written."""
    from .tokenizer import load_proto, special_ids, write_hf_tokenizer

    for f in tokenizer_files(folder):
        copy_file(f, out / f.name)
    if (folder / "tokenizer.json").is_file():
        return
    # A transformers-4-era folder (tokenizer.model + LlamaTokenizer config): write the fast files
    # ourselves, so transformers 5 segments as SentencePiece does (see llamaforge.tokenizer).
    proto = load_proto(folder / "tokenizer.model")
    ids = special_ids(proto, folder)
    pad = [proto.pieces[ids["pad"]].piece] if "pad" in ids and ids["pad"] not in (
        ids.get("unk"), ids.get("bos"), ids.get("eos")) else []
    write_hf_tokenizer(proto, out, pad)


def _versions() -> dict:
    import numpy
    import safetensors

    return {"llamaforge": __version__, "torch": torch.__version__.split("+")[0],
            "safetensors": safetensors.__version__, "numpy": numpy.__version__}


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _refuse_adapters_already_in(base: Path, loras) -> None:
    """A folder this merge wrote, given again as a base: an adapter whose weights its llamaforge.json
    records among the inputs (by sha256, so a copy or a moved folder counts too) is refused, since
    merging it again would add its update twice. Another tool's folder, or a manifest that is not a
    merge's, says nothing about what is in the weights and is taken as a plain base."""
    import json

    try:
        manifest = json.loads((base / "llamaforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(manifest, dict) or manifest.get("llamaforge") != "merge":
        return
    hashes = manifest.get("inputs_sha256")
    merged = {h for k, h in hashes.items() if isinstance(k, str) and Path(k).name in ADAPTER_WEIGHTS} \
        if isinstance(hashes, dict) else set()
    for p in loras:
        for name in ADAPTER_WEIGHTS:
            f = Path(p) / name
            if merged and f.is_file() and sha256_cached(f) in merged:
                raise LlamaforgeError(
                    f"this adapter is already merged into the base {os.fspath(base)} (its llamaforge.json lists "
                    "it among the merge's inputs); merging it again would add its update twice", p,
                    "give the original base model with the whole adapter list, or leave this adapter out")


def merge_lora(base: str | os.PathLike, loras=(), output: str | os.PathLike = "merged", tokenizer=None,
               dtype: str = D.MERGE_DTYPE, max_shard_size: str | int = D.MAX_SHARD_SIZE, device: str = D.MERGE_DEVICE,
               echo=print, progress: bool = True) -> dict:
    """Merge `loras` (in order) into `base`; write a Hugging Face folder at `output` atomically.

    Returns the manifest written as `output/llamaforge.json`.
    """
    guard_output(output, "merge", [("base model folder", base), ("tokenizer folder", tokenizer)]
                 + [("adapter folder", p) for p in loras])
    base = require_dir(base, "base model folder")
    seen: dict[Path, str] = {}
    for p in loras:
        key = Path(p).resolve()
        if key in seen:
            raise LlamaforgeError(f"the same adapter is listed twice (also as {seen[key]})", p,
                                  "list each adapter once, in merge order")
        seen[key] = os.fspath(p)
    _refuse_adapters_already_in(base, loras)
    out_dtype = torch_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamaforgeError("--device cuda but no CUDA device is available", None, "use --device cpu")
    # the base, described once (a garbled count or theta is refused here, not copied on)
    folder = ModelFolder(base, "base model folder")
    config, family = folder.config, folder.family
    _ = folder.generation_config  # an object, or refused here
    src = folder.tensors()
    adapters: list[Adapter] = []
    try:
        names = set(src.keys())
        tied = bool(config.get("tie_word_embeddings", False))
        if tied:
            names.add(LM_HEAD_HF)
        if EMBED_HF not in src:
            raise LlamaforgeError(f"the base has no {EMBED_HF}", base, "point to a LLaMA-family Hugging Face model")
        adapters = [open_adapter(p, names) for p in loras]
        plans = plan_merge(src, adapters, out_dtype, tied)
        by_name = {p.name: p for p in plans}
        rows = by_name[EMBED_HF].out.shape[0]
        head = by_name.get(LM_HEAD_HF)
        if head is not None and head.out.shape[0] != rows:
            raise LlamaforgeError(
                f"after the adapters embed_tokens has {rows} rows but lm_head has {head.out.shape[0]}",
                adapters[-1].folder if adapters else base,
                "use adapters that store both embed_tokens and lm_head in full (modules_to_save)",
            )
        tok_folder = _resolve_tokenizer(tokenizer, adapters, base)
        tok_len = check_tokenizer(tok_folder)  # the one tokenizer check, here at the first command
        base_rows = src.info(EMBED_HF).shape[0]
        # Qwen2 and others ship embeddings padded past the tokenizer (151936 rows, 151665 tokens):
        # kept as released when no adapter changed the vocabulary.
        padded = (tok_len < rows == base_rows and not any(EMBED_HF in ad.full for ad in adapters)
                  and ships_padding(base, base_rows))
        if padded:
            echo(f"the embeddings have {rows - tok_len} rows past the tokenizer's {tok_len} tokens, as the base "
                 "ships them (padding)")
        if tok_len != rows and not padded:
            full_embeds = any(EMBED_HF in ad.full for ad in adapters)
            if not full_embeds and tok_len > base_rows:
                raise LlamaforgeError(
                    f"the tokenizer has {tok_len} tokens but the base has {base_rows} embedding rows and no adapter "
                    f"stores full embed_tokens/lm_head. {VOCAB_EXPLAINED}", tok_folder,
                    "add the adapter that extends the vocabulary (first in the list), or use the base's own tokenizer",
                )
            raise LlamaforgeError(
                f"the tokenizer has {tok_len} tokens but the merged embeddings have {rows} rows. {VOCAB_EXPLAINED}",
                tok_folder,
                "use the tokenizer shipped with the last adapter (tokenizer: in config.yaml, or --tokenizer), "
                "and check the adapter order",
            )
        untie = tied and LM_HEAD_HF in by_name
        total = sum(p.out.nbytes for p in plans)
        echo(f"merging {len(adapters)} adapter(s) into {base} ({family.architecture}): {len(plans)} tensors, {total / 1e9:.2f} GB {dtype}, "
             f"vocabulary {base_rows} -> {rows}, tokenizer {tok_folder} ({tok_len})")
        for i, ad in enumerate(adapters):
            echo(f"  adapter {i + 1}: {ad.folder} (r={ad.config['r']}, alpha={ad.config['lora_alpha']}, "
                 f"{len(ad.updates)} LoRA updates, {len(ad.full)} full tensors)")

        with atomic_dir(output, need_bytes=total) as tmp:
            writer = ShardedSafetensorsWriter(tmp, plan_shards([p.out for p in plans], shard_bytes))
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                           mininterval=1.0, dynamic_ncols=True)
            # Input hashes are computed beside the merge (the page cache serves both).
            inputs = [p for p in src.weight_files()] + [base / "config.json"]
            for ad in adapters:
                inputs += [ad.folder / "adapter_config.json", ad.weights_file]
            inputs += tokenizer_files(tok_folder)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamaforge-hash") as hasher:
                input_hashes = hasher.submit(lambda: {os.fspath(p): sha256_cached(p) for p in inputs})
                try:
                    _Merger(src, adapters, device).run(plans, writer, bar)
                except BaseException:
                    writer.abort()
                    raise
                finally:
                    if bar is not None:
                        bar.close()
                outputs = writer.close()
                input_hashes = input_hashes.result()

            cfg = dict(config)
            cfg.pop("_name_or_path", None)
            cfg["vocab_size"] = rows
            cfg["tie_word_embeddings"] = bool(tied and not untie)
            cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = dtype
            write_json(tmp / "config.json", cfg)
            if (base / "generation_config.json").is_file():
                copy_file(base / "generation_config.json", tmp / "generation_config.json")
            else:
                write_json(tmp / "generation_config.json", {
                    k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None})
            _copy_tokenizer(tok_folder, tmp)
            outputs = hash_files(tmp, outputs)
            manifest = {
                "llamaforge": "merge",
                "base": {"path": os.fspath(base), "vocab_size": base_rows},
                "adapters": [{"order": i + 1, "path": os.fspath(ad.folder), "config": ad.config,
                              "lora_updates": len(ad.updates), "full_tensors": sorted(ad.full)}
                             for i, ad in enumerate(adapters)],
                "tokenizer": {"path": os.fspath(tok_folder), "length": tok_len},
                "options": {"dtype": dtype, "max_shard_size": str(max_shard_size)},
                "inputs_sha256": input_hashes,
                "outputs_sha256": outputs,
                "versions": _versions(),
                "vocab_size": rows,
            }
            write_json(tmp / "llamaforge.json", manifest)
        echo(f"wrote {output}: {len(writer.names)} shard(s), vocab_size {rows}")
        return manifest
    finally:
        folder.close()
        for ad in adapters:
            ad.close()
