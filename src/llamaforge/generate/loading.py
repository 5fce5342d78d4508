"""Model loading: device and dtype, the model's config, the tokenizer, the model and its adapters
(applied on the fly with PEFT), all checked before any weight is read.

A model input is described once (`llamaforge.model.ModelFolder`: config.json, dimensions,
generation config, tokenizer, tensor index) and that description is passed down: every function
here takes a ModelFolder or a path (`model_folder` describes a path)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import LlamaforgeError
from ..files.reading import require_dir
from ..model import ModelFolder
from ..tokenizer import HF_FILES, has_tokenizer
from .adapters import AdapterInfo, inspect_adapters, model_folder, plan_vocab

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamaforgeError("--device cuda but no CUDA device is available", None,
                              "use --device cpu (or auto), or run on a GPU node (gpu: 1 in config.yaml)")
    if device not in ("cpu", "cuda"):
        raise LlamaforgeError(f"unknown device {device!r}", None, "use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """float32 on the CPU (float16 matmuls are slow and inexact there), float16 on CUDA, unless given."""
    import torch

    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.float16
    from ..formats.dtypes import torch_dtype

    return torch_dtype(dtype)


def _dtype_kwarg(dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def base_vocab_size(folder: str | os.PathLike | ModelFolder) -> int:
    """The embedding rows config.json gives the model (vocab_size)."""
    m = model_folder(folder)
    cfg = m.config
    n = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not isinstance(n, int):
        raise LlamaforgeError("config.json has no vocab_size", m.config_path, "add vocab_size")
    return n


def check_model_config(folder: str | os.PathLike | ModelFolder) -> ModelFolder:
    """The clear error for a Meta checkpoint, a folder without config.json, one whose counts are
    garbled (a string, 0, null) or whose generation_config.json is no object: never a traceback
    from transformers (which reads both when it loads the tokenizer or the model). Returns the
    folder's ModelFolder (built here from a path: config.json and its dimensions checked)."""
    m = model_folder(folder)
    m.generation_config  # noqa: B018 -- read (and checked as an object) before transformers reads it
    return m


def load_causal_lm(folder: str | os.PathLike | ModelFolder, dtype, device: str = "cpu"):
    """AutoModelForCausalLM in `dtype` on `device`, in eval mode, never trusting remote code.

    `folder`: a ModelFolder (its description reused: config.json is not read again by llamaforge)
    or a path. Its tensor index is closed once checked (a later `tensors()` opens it again)."""
    from transformers import AutoModelForCausalLM

    m = check_model_config(folder)
    # every weight file checked first, pickles with weights_only=True: a hostile .bin is one clear
    # error here, not a traceback from transformers; closed before transformers reads the weights
    try:
        m.tensors()
    finally:
        m.close()
    model = AutoModelForCausalLM.from_pretrained(os.fspath(m.path), trust_remote_code=False, **_dtype_kwarg(dtype))
    if device != "cpu":
        model = model.to(device)
    model.eval()
    return model


def resize_embeddings(model, rows: int) -> None:
    """Grow embed_tokens/lm_head to `rows`, new rows set to the mean of the old ones.

    Deterministic (transformers' mean_resizing samples each new row from a normal, ~36 ms a row at
    hidden 2048; mean_resizing=False leaves them random), so results that see those rows, e.g.
    the equivalence check with the last adapter disabled, are reproducible.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    if rows <= old:
        return
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            w = layer.weight
            w[old:] = w[:old].mean(dim=0, keepdim=True)


def apply_adapters(model, adapters: Sequence[AdapterInfo], sizes: Sequence[int]):
    """Apply adapters in order: resize to each one's vocabulary, merge all but the last (PEFT).

    Full tensors an adapter stores (embed_tokens / lm_head) replace the model's, so the embedding is
    first resized to the adapter's rows (mean_resizing=False: the adapter overwrites every row).
    """
    import warnings

    from peft import PeftModel

    for i, (a, rows) in enumerate(zip(adapters, sizes[1:])):
        if model.get_input_embeddings().weight.shape[0] != rows:
            resize_embeddings(model, rows)
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, os.fspath(a.path), is_trainable=False)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    model.eval()
    return model


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: str
    dtype: object
    vocab: int
    context_length: int
    sources: dict = field(default_factory=dict)


def default_tokenizer_dir(model: str | os.PathLike | ModelFolder, loras: Sequence[str | os.PathLike] = ()) -> Path:
    """The merge's rule (merge._resolve_tokenizer): the last adapter folder holding a tokenizer
    (tokenizer.has_tokenizer: tokenizer.model or tokenizer.json), else the model's folder."""
    own = model.tokenizer.folder if isinstance(model, ModelFolder) else Path(model)
    return next((Path(p) for p in reversed(loras) if has_tokenizer(p)), own)


def load_tokenizer(folder: str | os.PathLike):
    from ..tokenizer import load_hf_tokenizer

    d = require_dir(folder, "tokenizer folder")
    if not any((d / f).is_file() for f in HF_FILES):
        raise LlamaforgeError("no tokenizer files (tokenizer.json, tokenizer.model)", d,
                              "pass --tokenizer with a tokenizer folder, e.g. tokenizers/<name>")
    tok = load_hf_tokenizer(d)
    if len(tok) < 10:
        raise LlamaforgeError(f"the tokenizer loaded with only {len(tok)} tokens", d,
                              "rebuild it with scripts/merge_tokenizers.py (writes tokenizer.json)")
    return tok


def load_model(model: str | os.PathLike | ModelFolder, loras: Sequence[str | os.PathLike] = (), tokenizer=None,
               device: str = "auto", dtype: str | None = "auto", allow_vocab_jump: bool = False,
               echo: Callable[[str], None] | None = None) -> Loaded:
    """Tokenizer + model (+ adapters on the fly), checked before any weight is read.

    The model folder is described once (a ModelFolder, or one built here from the path) and that
    description serves every check and the loading."""
    echo = echo or log.info
    name = os.fspath(model.path if isinstance(model, ModelFolder) else model)
    m = check_model_config(model)
    try:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        tok_dir = Path(tokenizer) if tokenizer else default_tokenizer_dir(m, loras)
        tok = load_tokenizer(tok_dir)
        base_vocab = base_vocab_size(m)
        infos = inspect_adapters(m, loras)
        sizes = plan_vocab(base_vocab, infos, len(tok), tok_dir, name, allow_vocab_jump, tok.pad_token_id)
        echo(f"Vocab of the model: {base_vocab}" + (f" -> {' -> '.join(map(str, sizes[1:]))} with adapters" if infos else ""))
        echo(f"Vocab of the tokenizer: {len(tok)} ({tok_dir})")
        lm = load_causal_lm(m, dt, dev)
    finally:
        m.close()
    if infos:
        echo(f"Applying {len(infos)} adapter(s) with PEFT: {', '.join(os.fspath(a.path) for a in infos)}")
        lm = apply_adapters(lm, infos, sizes)
        if dev != "cpu":
            lm = lm.to(dev)
        # adapters are stored in float16; compute in the requested dtype
        lm = lm.to(dt)
    context = getattr(lm.config, "max_position_embeddings", None) or 2048
    return Loaded(lm, tok, dev, dt, sizes[-1], int(context),
                  {"model": name, "loras": [os.fspath(p) for p in loras], "tokenizer": os.fspath(tok_dir)})
