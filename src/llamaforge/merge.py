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

import logging
import os
import queue
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import LlamaforgeError
from .formats import (
    ModelSource,
    SafetensorsFile,
    ShardedSafetensorsWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    read_hf_config,
    torch_dtype,
)
from .fsutil import atomic_dir, guard_output, hash_files, require_dir, sha256_cached, write_json
from .lora import Adapter, LoraUpdate, open_adapter

log = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_EXPLAINED = (
    "LLaMA's vocabulary has 32000 tokens, Chinese-LLaMA's 49953 and Chinese-Alpaca's 49954 (+[PAD]); "
    "the rows for the added tokens come only from an adapter that stores full embed_tokens and lm_head "
    "(Chinese-LLaMA-Plus-LoRA, then Chinese-Alpaca-Plus-LoRA)"
)
_BLOCK_ELEMS = 2 << 20  # elements per block of rows (8 MB in float32)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def tensor_order(name: str):
    """HF's own order: embeddings, layers by number, final norm, head."""
    group = 0 if "embed_tokens" in name else 3 if name.startswith("lm_head") else 1 if ".layers." in name else 2
    return (group, _natural(name))


def tokenizer_length(folder: Path) -> int:
    """Tokens of a tokenizer folder without importing transformers: its SentencePiece pieces, or
    more when tokenizer.json or added_tokens.json give ids beyond them."""
    from .fsutil import read_json
    from .tokenizer import check_tokenizer_json, load_proto

    check_tokenizer_json(folder)
    ids = [len(load_proto(folder / "tokenizer.model", "tokenizer.model").pieces) - 1]
    tj = folder / "tokenizer.json"
    try:
        if tj.is_file():
            data = read_json(tj, "tokenizer.json")
            ids += [int(t["id"]) for t in data.get("added_tokens", [])]
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                ids += [int(i) for i in vocab.values()]
        at = folder / "added_tokens.json"
        if at.is_file():
            ids += [int(i) for i in read_json(at, "added_tokens.json").values()]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise LlamaforgeError("the tokenizer's token ids are malformed (an id that is not a number, or an added "
                              "token without one)", folder, "restore the tokenizer files from its release") from None
    return max(ids) + 1


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
        folder = next((ad.folder for ad in reversed(adapters) if (ad.folder / "tokenizer.model").is_file()), base)
    if not (folder / "tokenizer.model").is_file():
        raise LlamaforgeError(
            "no tokenizer.model in the tokenizer folder", folder,
            "pass --tokenizer (tokenizer: in config.yaml) pointing to a folder with tokenizer.model, e.g. tokenizers/NAME",
        )
    return folder


def plan_merge(base: ModelSource, adapters: list[Adapter], dtype: torch.dtype, tied: bool) -> list[TensorPlan]:
    """Decide, for every output tensor, where it starts and which updates apply; check shapes and vocab."""
    names = [n for n in base.keys() if not n.endswith("rotary_emb.inv_freq")]
    if tied and LM_HEAD not in base and any(LM_HEAD in ad.full or LM_HEAD in ad.updates for ad in adapters):
        names.append(LM_HEAD)  # an adapter unties the head
    plans = []
    for name in sorted(names, key=tensor_order):
        from_name = EMBED if (name == LM_HEAD and name not in base) else name
        base_info = base.info(from_name)
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
                if name in (EMBED, LM_HEAD):
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
                            if name in (EMBED, LM_HEAD) else "")
                    raise LlamaforgeError(
                        f"the LoRA update of {name} has shape {list(ds)} but the tensor is {list(shape)}{hint}",
                        ad.weights_file, "use the adapter trained for this base, in the right order",
                    )
                updates.append((i, up))
        src_dtype = ad.info(start[1]).dtype if start else base_info.dtype
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        plans.append(TensorPlan(name, TensorInfo(name, out_dtype, tuple(shape)), start, updates, from_name))
    return plans


class _Stop(Exception):
    pass


_FP16_MAX = 65504.0


class _Merger:
    """Block-streaming merge: a reader thread, the arithmetic in the calling thread, a writer thread.

    Tensors flow through in blocks of rows (at most _BLOCK_ELEMS elements) held in a few reusable
    buffers, so memory stays flat whatever the model or tensor size, and no fresh pages are
    faulted in per tensor. Torch runs single-threaded here: the three stages are the parallelism.
    """

    def __init__(self, base: ModelSource, adapters: list[Adapter], device: str):
        self.base, self.adapters, self.device = base, adapters, device
        self.block_elems = _BLOCK_ELEMS

    # -- reading ---------------------------------------------------------------------------
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

    def _blocks(self, p: TensorPlan):
        rows, width = self._rows(p)
        step = max(1, self.block_elems // max(1, width))
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step)

    def _read_loop(self, plans, free: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
        try:
            done: list[str] = []
            for p in plans:
                src, tname = self._source(p)
                _, width = self._rows(p)
                f = src.file_of(tname) if isinstance(src, ModelSource) else src
                for r0, r1 in self._blocks(p):
                    buf = free.get()  # a token: at most nbuf blocks are in flight
                    if stop.is_set():
                        return
                    count = (r1 - r0) * width
                    if isinstance(f, SafetensorsFile):  # no copy: a view of the page cache
                        view, release = f.view_flat(tname, r0 * width, count)
                    else:
                        item = src.info(tname).dtype.itemsize
                        if buf.numel() < count * item:  # a single row wider than a block
                            buf = torch.empty(count * item, dtype=torch.uint8)
                        view, release = src.read_flat(tname, r0 * width, count, buf), None
                    out.put((r0, r1, buf, view, release))
                if p.start is None:
                    done.append(p.from_name)
                    self.base.release(done)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            out.put(e)

    # -- arithmetic ------------------------------------------------------------------------
    def _factors(self, p: TensorPlan):
        factors = []
        for i, up in p.updates:
            ad = self.adapters[i]
            A = ad.get(up.A).to(self.device, torch.float32)
            B = ad.get(up.B).to(self.device, torch.float32)
            L, R = (A.T.contiguous(), B.T.contiguous()) if (up.embedding or up.fan_in_fan_out) else (B, A)
            mag = None if up.magnitude is None else ad.get(up.magnitude).to(self.device, torch.float32).reshape(-1)
            factors.append((L, R, up.scale, mag))
        return factors

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
        in_free: queue.Queue = queue.Queue()
        out_free: queue.Queue = queue.Queue()
        for _ in range(nbuf):
            in_free.put(torch.empty(self.block_elems * 4, dtype=torch.uint8))
            out_free.put(torch.empty(self.block_elems * 4, dtype=torch.uint8))
        scratch = torch.empty(self.block_elems, dtype=torch.float32, device=self.device)
        blocks: queue.Queue = queue.Queue(maxsize=nbuf)
        writes: queue.Queue = queue.Queue(maxsize=nbuf)
        stop = threading.Event()
        failure: list[BaseException] = []

        def write_loop():
            while True:
                item = writes.get()
                if item is None:
                    return
                name, data, pool, buf, release = item

                def done(pool=pool, buf=buf, release=release):
                    # the block is written and hashed: its pages and its buffer can go
                    if release is not None:
                        release()
                    if pool is not None:
                        pool.put(buf)

                try:
                    if failure:
                        done()
                        continue
                    nbytes = data.numel() * data.element_size()
                    writer.write_block(name, data, done)
                    if progress is not None:
                        progress.update(nbytes)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(e)
                    done()
                finally:
                    del data

        reader = threading.Thread(target=self._read_loop, args=(plans, in_free, blocks, stop),
                                  name="llamaforge-reader", daemon=True)
        wthread = threading.Thread(target=write_loop, name="llamaforge-writer", daemon=True)
        reader.start()
        wthread.start()
        try:
            for p in plans:
                factors = self._factors(p)
                _, width = self._rows(p)
                if progress is not None:
                    progress.set_postfix_str(p.name, refresh=False)
                for _ in self._blocks(p):
                    item = blocks.get()
                    if isinstance(item, BaseException):
                        raise item
                    if failure:
                        raise _Stop()
                    r0, r1, ibuf, view, release = item
                    n = view.numel()
                    same = view.dtype == p.out.dtype
                    if not factors and same and not p.changed:
                        # untouched: bytes pass straight through
                        writes.put((p.name, view, in_free, ibuf, release))
                        continue
                    blk = scratch[:n] if n <= scratch.numel() else torch.empty(n, dtype=torch.float32, device=self.device)
                    blk.copy_(view)
                    if release is not None:
                        release()
                    in_free.put(ibuf)
                    if factors:
                        b2 = blk.view(r1 - r0, width)
                        for L, R, scale, mag in factors:
                            b2.addmm_(L[r0:r1], R, alpha=scale)
                            if mag is not None:
                                b2.mul_((mag[r0:r1] / torch.linalg.norm(b2, dim=1)).view(-1, 1))
                    if p.changed or not same:
                        self._check(p, blk)
                    obuf = out_free.get()
                    size = n * p.out.dtype.itemsize
                    if obuf.numel() < size:
                        obuf = torch.empty(size, dtype=torch.uint8)
                    out = obuf[:size].view(p.out.dtype)
                    out.copy_(blk)
                    writes.put((p.name, out, out_free, obuf, None))
                    del view, blk, out
            if failure:
                raise _Stop()
        except _Stop:
            pass
        finally:
            stop.set()
            while reader.is_alive():  # unblock the reader wherever it waits, until it sees `stop`
                in_free.put(torch.empty(0, dtype=torch.uint8))
                try:
                    blocks.get(timeout=0.05)
                except queue.Empty:
                    pass
            writes.put(None)
            wthread.join()
            torch.set_num_threads(prev_threads)
        if failure:
            raise failure[0]


def _copy_tokenizer(folder: Path, out: Path) -> None:
    from .tokenizer import load_proto, special_ids, write_hf_tokenizer

    shutil.copyfile(folder / "tokenizer.model", out / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            if (folder / f).is_file():
                shutil.copyfile(folder / f, out / f)
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


def merge_lora(base: str | os.PathLike, loras=(), output: str | os.PathLike = "merged", tokenizer=None,
               dtype: str = "float16", max_shard_size: str | int = "5GB", device: str = "cpu",
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
    out_dtype = torch_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamaforgeError("--device cuda but no CUDA device is available", None, "use --device cpu")
    config = read_hf_config(base)
    src = ModelSource(base)
    adapters: list[Adapter] = []
    try:
        names = set(src.keys())
        tied = bool(config.get("tie_word_embeddings", False))
        if tied:
            names.add(LM_HEAD)
        if EMBED not in src:
            raise LlamaforgeError(f"the base has no {EMBED}", base, "point to a LLaMA-family Hugging Face model")
        adapters = [open_adapter(p, names) for p in loras]
        plans = plan_merge(src, adapters, out_dtype, tied)
        by_name = {p.name: p for p in plans}
        rows = by_name[EMBED].out.shape[0]
        head = by_name.get(LM_HEAD)
        if head is not None and head.out.shape[0] != rows:
            raise LlamaforgeError(
                f"after the adapters embed_tokens has {rows} rows but lm_head has {head.out.shape[0]}",
                adapters[-1].folder if adapters else base,
                "use adapters that store both embed_tokens and lm_head in full (modules_to_save)",
            )
        tok_folder = _resolve_tokenizer(tokenizer, adapters, base)
        tok_len = tokenizer_length(tok_folder)
        base_rows = src.info(EMBED).shape[0]
        if tok_len != rows:
            full_embeds = any(EMBED in ad.full for ad in adapters)
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
        untie = tied and LM_HEAD in by_name
        total = sum(p.out.nbytes for p in plans)
        echo(f"merging {len(adapters)} adapter(s) into {base}: {len(plans)} tensors, {total / 1e9:.2f} GB {dtype}, "
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
            inputs += [tok_folder / "tokenizer.model"]
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
                shutil.copyfile(base / "generation_config.json", tmp / "generation_config.json")
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
        for ad in adapters:
            ad.close()
        src.close()
