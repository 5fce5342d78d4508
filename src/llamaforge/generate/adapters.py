"""Adapters and the vocabulary chain: what each PEFT adapter folder stores (read without its
weights or transformers), and the embedding rows the model has after each adapter, checked against
the known misuses of the Chinese-LLaMA/Alpaca chain before any weight is read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import LlamaforgeError
from ..files.reading import require_dir
from ..model import ModelFolder
from ..tokenizer import has_tokenizer, check_tokenizer_fits


def model_folder(model: str | os.PathLike | ModelFolder) -> ModelFolder:
    """The description of a model input: a ModelFolder as given, or built from a path (config.json
    read and checked once; pass the result down rather than the path)."""
    return model if isinstance(model, ModelFolder) else ModelFolder(model)


@dataclass
class AdapterInfo:
    path: Path
    rows: int | None  # rows of the full embed_tokens / lm_head the adapter stores (None: LoRA only)
    tokenizer_len: int | None = None  # length of the tokenizer in the adapter's folder
    pad_id: int | None = None  # that tokenizer's pad token id


def _json_pad_id(folder: Path) -> int | None:
    """The pad id of a tokenizer.json folder (no tokenizer.model), as transformers and llama.cpp's
    converter take it: tokenizer_config.json's pad_token, looked up among tokenizer.json's added
    tokens, then its vocabulary; None when it names none (the JSON files are checked before)."""
    from ..files.reading import read_json

    tc = folder / "tokenizer_config.json"
    entry = read_json(tc, "tokenizer_config.json").get("pad_token") if tc.is_file() else None
    content = entry.get("content") if isinstance(entry, dict) else entry
    if not isinstance(content, str):
        return None
    tj = read_json(folder / "tokenizer.json", "tokenizer.json")
    for tok in tj.get("added_tokens") or []:
        if isinstance(tok, dict) and tok.get("content") == content and isinstance(tok.get("id"), int):
            return tok["id"]
    vocab = (tj.get("model") or {}).get("vocab")
    tid = vocab.get(content) if isinstance(vocab, dict) else None
    return tid if isinstance(tid, int) else None


def inspect_adapter(folder: str | os.PathLike, base_names) -> AdapterInfo:
    """Read an adapter folder's tensor directory (no weights), mapped onto the base's tensor names,
    and the length of the tokenizer stored with it (read without transformers)."""
    from ..merge.lora import open_adapter
    from ..model import EMBED_HF, LM_HEAD_HF
    from ..tokenizer import check_tokenizer, load_proto, special_ids

    d = require_dir(folder, "adapter folder")
    if not (d / "adapter_config.json").is_file():
        raise LlamaforgeError("no adapter_config.json: not a PEFT adapter folder", d,
                              "point --lora (or loras: in config.yaml) at a folder holding adapter_config.json "
                              "and adapter_model.safetensors")
    ad = open_adapter(d, base_names)
    try:
        embed, head = ad.full_rows(EMBED_HF), ad.full_rows(LM_HEAD_HF)
    finally:
        ad.close()
    if embed is not None and head is not None and embed != head:
        raise LlamaforgeError(f"the adapter's embed_tokens has {embed} rows but its lm_head {head}", ad.weights_file,
                              "use an adapter whose embedding and head match")
    info = AdapterInfo(d, embed if embed is not None else head)
    # the tokenizer package's rule (as the merge's): tokenizer.model or tokenizer.json beside the adapter
    if has_tokenizer(d):
        info.tokenizer_len = check_tokenizer(d)
        if (d / "tokenizer.model").is_file():
            info.pad_id = special_ids(load_proto(d / "tokenizer.model"), d).get("pad")
        else:
            info.pad_id = _json_pad_id(d)
        if info.rows is not None and info.tokenizer_len != info.rows:
            raise LlamaforgeError(
                f"the adapter stores {info.rows} embedding rows but the tokenizer in its folder has "
                f"{info.tokenizer_len} tokens", d,
                "keep each adapter with its own tokenizer: the LLaMA tokenizer with the LLaMA(-Plus) LoRA and the "
                "Alpaca tokenizer with the Alpaca(-Plus) LoRA")
    return info


def inspect_adapters(model: str | os.PathLike | ModelFolder, loras: Sequence[str | os.PathLike]) -> list[AdapterInfo]:
    """inspect_adapter for each of `loras`, against the tensors of the model they are applied to
    (plus lm_head when its embeddings are tied, as the merge does). `model`: its ModelFolder (the
    tensor index it holds is reused) or a path."""
    if not loras:
        return []
    from ..model import LM_HEAD_HF

    m = model_folder(model)
    try:
        names = set(m.tensors().keys())
    finally:
        if m is not model:  # described here: its tensor index is ours to close
            m.close()
    if m.config.get("tie_word_embeddings", False):
        names.add(LM_HEAD_HF)
    return [inspect_adapter(p, names) for p in loras]


def plan_vocab(base_vocab: int, adapters: Sequence[AdapterInfo], tokenizer_len: int | None = None,
               tokenizer_path: str | os.PathLike | None = None, base_path: str | os.PathLike | None = None,
               allow_vocab_jump: bool = False, tokenizer_pad_id: int | None = None) -> list[int]:
    """The embedding rows the model has after each step: [base, after adapter 1, ...].

    Raises for the known misuses of the Chinese-LLaMA/Alpaca chain (32000 -> 49953 -> 49954).
    """
    sizes = [base_vocab]
    cur = base_vocab
    for i, a in enumerate(adapters):
        rows = a.rows
        if rows is None:
            sizes.append(cur)
            continue
        if rows < cur:
            raise LlamaforgeError(
                f"the adapter stores {rows} embedding rows but the model it is applied to already has {cur}; "
                "the vocabulary must never shrink along the adapter list", a.path,
                "list the adapters in training order (LLaMA-Plus before Alpaca-Plus) on the base they were trained on")
        pad = a.pad_id
        if pad is None and a.tokenizer_len is None and i == len(adapters) - 1 and tokenizer_len == rows:
            pad = tokenizer_pad_id  # no tokenizer beside the adapter: the model's tokenizer speaks for it
        if not allow_vocab_jump and pad is not None and pad == rows - 1 and cur < rows - 1:
            raise LlamaforgeError(
                f"this is an Alpaca-Plus-style adapter ({rows - 1} pieces + a padding token = {rows} rows), applied "
                f"to a model with {cur} rows that lacks the LLaMA-Plus vocabulary. Alpaca-Plus is trained on top of "
                "LLaMA-Plus: the chain is LLaMA (32000) -> LLaMA-Plus LoRA (49953) -> Alpaca-Plus LoRA (49954)", a.path,
                "apply the LLaMA-Plus adapter first (--lora LLAMA_PLUS --lora ALPACA_PLUS; loras: [llama_plus, "
                "alpaca_plus] in config.yaml); if this adapter really was trained on the base directly (Chinese-Alpaca "
                "v1), pass --allow-vocab-jump")
        cur = rows
        sizes.append(cur)
    if tokenizer_len is not None:  # the one check of the tokenizer against the rows (the merge's too)
        check_tokenizer_fits(tokenizer_len, sizes, any(a.rows is not None for a in adapters), tokenizer_path,
                             base_path)
    return sizes
