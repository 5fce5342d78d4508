"""`merge_lora`: the base (a ModelFolder) and the adapters in order into a Hugging Face folder,
written atomically, with the tokenizer and the manifest (llamaforge.json).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import __version__
from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import atomic_dir, write_json
from ..files.guard import guard_output, json_of_kind, register_output_kind
from ..files.hashing import copy_file, hash_files, sha256_cached
from ..files.reading import require_dir
from ..formats.dtypes import parse_size, torch_dtype
from ..formats.safetensors import ShardedSafetensorsWriter, plan_shards
from ..model import EMBED_HF, LM_HEAD_HF, ModelFolder
from ..tokenizer import check_tokenizer, check_tokenizer_fits, tokenizer_files
from .lora import Adapter, open_adapter
from .merger import _Merger
from .plan import _refuse_adapters_already_in, _resolve_tokenizer, plan_merge

log = logging.getLogger(__name__)

# a merged folder is llamaforge's by its manifest, llamaforge.json {"llamaforge": "merge", ...}
register_output_kind("merge", "merged model folder", lambda p: json_of_kind("merge")(p / "llamaforge.json"), folder=True)


def _copy_tokenizer(folder: Path, out: Path) -> None:
    """The tokenizer's files, byte for byte (tokenizer.json tokenizers, chat template included); a
    tokenizer.model without Hugging Face files gets them written."""
    from ..tokenizer import load_proto, special_ids, write_hf_tokenizer

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
        chain = [base_rows]  # the embedding rows after each adapter
        for ad in adapters:
            full = ad.full.get(EMBED_HF)
            chain.append(ad.info(full).shape[0] if full is not None else chain[-1])
        extended = any(EMBED_HF in ad.full for ad in adapters)
        if check_tokenizer_fits(tok_len, chain, extended, tok_folder, base):
            echo(f"the embeddings have {rows - tok_len} rows past the tokenizer's {tok_len} tokens, as the base "
                 "ships them (padding)")
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
