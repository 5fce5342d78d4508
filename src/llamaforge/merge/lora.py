"""PEFT adapters: reading them across PEFT's key-naming variants, and their merge arithmetic.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`). Its
keys name modules of the wrapped model, e.g.

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight         (PEFT >= 0.3)
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight  (saved from a live model)
    base_model.model.model.embed_tokens.weight                              (full tensor, Chinese LoRAs)
    base_model.model.lm_head.modules_to_save.default.weight                 (full tensor, modules_to_save)
    base_model.model.model.embed_tokens.base_layer.weight                   (full tensor, save_embedding_layers)
    base_model.model.model.embed_tokens.lora_embedding_A                    (LoRA on an embedding)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (DoRA)

Everything is reduced to: per base tensor, an optional full replacement and an optional low-rank
update (A, B, scale, fan_in_fan_out, DoRA magnitude, embedding flag).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from ..formats.dtypes import TensorInfo
from ..formats.pickles import TorchFile
from ..formats.safetensors import SafetensorsFile

_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_PREFIXES = ("base_model.model.", "base_model.")


@dataclass
class LoraUpdate:
    """W += scale * (B @ A) (transposed for fan_in_fan_out or embeddings), optionally DoRA-scaled."""

    module: str
    A: str | None = None  # adapter tensor names
    B: str | None = None
    magnitude: str | None = None
    embedding: bool = False
    r: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    folder: Path
    config: dict
    weights_file: Path
    source: SafetensorsFile | TorchFile
    full: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor name
    updates: dict[str, LoraUpdate] = field(default_factory=dict)  # base tensor name -> update
    ignored: list[str] = field(default_factory=list)

    def info(self, name: str) -> TensorInfo:
        return self.source.info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def full_rows(self, base_name: str) -> int | None:
        n = self.full.get(base_name)
        return None if n is None else self.info(n).shape[0]

    def close(self) -> None:
        self.source.close()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _split_key(key: str) -> tuple[str, str, str]:
    """-> (module path, kind, param) where kind is one of _KINDS, 'full' or 'ignore'."""
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _KINDS:
            rest = parts[i + 1:]
            param = rest[-1] if rest and rest[-1] in ("weight", "bias") else ""
            return ".".join(parts[:i]), part, param
        if part == "modules_to_save" and len(parts) >= i + 3:  # X.modules_to_save.<adapter>.weight
            return ".".join(parts[:i]), "full", parts[-1]
        if part == "base_layer":  # X.base_layer.weight (embedding layers saved with the adapter)
            return ".".join(parts[:i]), "full", parts[-1]
        if part == "original_module":  # PEFT's copy of the untouched base module: not a change
            return ".".join(parts[:i]), "ignore", parts[-1]
    return ".".join(parts[:-1]), "full", parts[-1]


def resolve_base_name(module: str, param: str, base_names) -> str | None:
    """Find the base tensor `module.param` under the naming variants of PEFT wrappers."""
    candidates = [f"{module}.{param}", f"model.{module}.{param}"]
    if module.startswith("model."):
        candidates.append(f"{module[len('model.'):]}.{param}")
    for c in candidates:
        if c in base_names:
            return c
    return None


def read_adapter_config(folder: Path) -> dict:
    from ..files.hashing import metadata_bytes
    from ..files.reading import in_folder

    path = in_folder(folder, "adapter_config.json", "adapter folder",
                     "point to a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin)")
    try:
        cfg = json.loads(metadata_bytes(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise LlamaforgeError("adapter_config.json is not UTF-8 text", path, "repair or re-download it") from None
    except json.JSONDecodeError as e:
        raise LlamaforgeError(f"adapter_config.json is not valid JSON ({e.msg}, line {e.lineno})", path,
                              "repair or re-download it") from None
    except RecursionError:
        raise LlamaforgeError("adapter_config.json is not valid JSON (nested too deeply)", path,
                              "repair or re-download it") from None
    if not isinstance(cfg, dict):
        raise LlamaforgeError(f"adapter_config.json holds a JSON {type(cfg).__name__}, not an object", path,
                              "save the adapter with PEFT (save_pretrained writes an object)")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LlamaforgeError(f"peft_type is {peft_type}; only LoRA adapters can be merged", path,
                              "use a LoRA adapter")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise LlamaforgeError(f"adapter_config.json lacks {key!r}", path, "save the adapter with PEFT")
        _check_number(cfg[key], key, path)
    if not float(cfg["r"]).is_integer():
        raise LlamaforgeError(f"r is {cfg['r']}; a LoRA rank is a whole number", path, "save the adapter with PEFT")
    if not cfg["r"] > 0:
        raise LlamaforgeError(f"r is {cfg['r']}; a LoRA rank must be positive", path, "save the adapter with PEFT")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise LlamaforgeError(f"{key} is not an object", path, "save the adapter with PEFT")
        for module, value in patterns.items():
            try:  # matched as PEFT does (_pattern_value): a key is a regular expression
                re.compile(rf"(.*\.)?({module})$")
            except re.error as e:
                raise LlamaforgeError(f"{key} key {module!r} is not a valid regular expression ({e})", path,
                                      "write the module name or a valid pattern, as PEFT saves it") from None
            _check_number(value, f"{key}[{module!r}]", path)
            if key == "rank_pattern" and not (float(value).is_integer() and value > 0):
                raise LlamaforgeError(f"rank_pattern[{module!r}] is {value}; a LoRA rank is a positive whole number",
                                      path, "save the adapter with PEFT")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise LlamaforgeError(f"{key} is {json.dumps(cfg[key])}, not true or false", path,
                                  f"write {key}: true or false (a JSON boolean, not a string)")
    return cfg


def _check_number(value, key: str, path: Path) -> None:
    """A finite number (not a bool, string, null, list, NaN or Inf: PEFT would multiply by it)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise LlamaforgeError(f"{key} is {json.dumps(value)}, not a finite number", path,
                              f"set {key} to the value the adapter was trained with (e.g. r: 8, lora_alpha: 32)")


def open_adapter(folder: str | os.PathLike, base_names) -> Adapter:
    """Read an adapter's config and tensor directory (not its data) and map it onto `base_names`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlamaforgeError("adapter folder not found", folder, "check the loras: list in config.yaml")
    cfg = read_adapter_config(folder)
    st, bin_ = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        wfile, source = st, SafetensorsFile(st)
    elif bin_.is_file():
        wfile, source = bin_, TorchFile(bin_)
    else:
        raise LlamaforgeError("no adapter_model.safetensors or adapter_model.bin in the adapter folder", folder,
                              "copy the adapter weights into the folder")
    ad = Adapter(folder=folder, config=cfg, weights_file=wfile, source=source)

    for name in source.keys():
        if 0 in source.info(name).shape:
            raise LlamaforgeError(
                f"tensor {name} is empty (shape {list(source.info(name).shape)}), a DeepSpeed ZeRO-3 saving accident",
                wfile, "save the adapter again after gathering the parameters (zero_to_fp32 / stage3_gather_16bit_weights_on_model_save)",
            )

    unmatched = []
    by_module: dict[str, dict[str, str]] = {}
    for name in source.keys():
        module, kind, param = _split_key(name)
        if kind == "ignore":
            ad.ignored.append(name)
        elif kind == "full":
            target = resolve_base_name(module, param, base_names)
            if target is None:
                unmatched.append(name)
            else:
                ad.full[target] = name
        else:
            if param == "bias" and kind == "lora_B":
                raise LlamaforgeError(f"{name}: adapters with lora_bias cannot be merged into LLaMA (no bias)",
                                      wfile, "train the adapter without lora_bias")
            by_module.setdefault(module, {})[kind] = name

    use_rslora = bool(cfg.get("use_rslora", False))
    use_dora = bool(cfg.get("use_dora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for module, parts in by_module.items():
        target = resolve_base_name(module, "weight", base_names)
        if target is None:
            unmatched.extend(parts.values())
            continue
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise LlamaforgeError(f"{module} has only one of the two LoRA factors", wfile,
                                  "the adapter file is incomplete: save it again")
        if "lora_magnitude_vector" in parts and not use_dora:
            raise LlamaforgeError(f"{module} has a DoRA magnitude but use_dora is false", folder / "adapter_config.json",
                                  "set use_dora to true or remove the magnitude tensors")
        if use_dora and "lora_magnitude_vector" not in parts:
            raise LlamaforgeError(f"use_dora is set but {module} has no lora_magnitude_vector", wfile,
                                  "save the adapter again with PEFT")
        if use_dora and fan_in_fan_out:
            raise LlamaforgeError(f"DoRA with fan_in_fan_out (Conv1D layers) on {module} is not supported by the merge",
                                  folder / "adapter_config.json", "merge this adapter with PEFT's merge_and_unload")
        if use_dora and embedding:
            raise LlamaforgeError(f"DoRA on the embedding {module} is not supported by the merge", wfile,
                                  "train DoRA on linear layers only, or merge with PEFT's merge_and_unload")
        # PEFT matches the patterns against the module path inside the wrapped model, which is
        # what remains of the key once the "base_model.model." prefix is gone.
        r = int(_pattern_value(rank_pattern, module, cfg["r"]))
        alpha = float(_pattern_value(alpha_pattern, module, cfg["lora_alpha"]))
        a_shape, b_shape = source.info(a).shape, source.info(b).shape
        rank_a = a_shape[0]
        rank_b = b_shape[1] if len(b_shape) == 2 else -1
        if rank_a != r or rank_b != r:
            raise LlamaforgeError(
                f"{module}: the factors have rank {rank_a}/{rank_b} but adapter_config.json gives r={r}"
                + (" (after rank_pattern)" if rank_pattern else ""),
                folder / "adapter_config.json", "use the adapter_config.json saved with these weights",
            )
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        ad.updates[target] = LoraUpdate(
            module=module, A=a, B=b, magnitude=parts.get("lora_magnitude_vector"), embedding=embedding,
            r=r, alpha=alpha, scale=scale, fan_in_fan_out=fan_in_fan_out,
        )

    if unmatched:
        shown = ", ".join(sorted(unmatched)[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise LlamaforgeError(
            f"{len(unmatched)} adapter tensors match no tensor of the base model: {shown}", wfile,
            "check that the adapter was trained on this base architecture (LLaMA) and that the base folder is right",
        )
    return ad


# ---------------------------------------------------------------------------------------------
# the arithmetic, on blocks of rows


@dataclass
class Factors:
    """One adapter's low-rank update of one tensor, ready to apply to any block of its rows:
    W[r0:r1] += scale * L[r0:r1] @ R, then (DoRA) each row scaled to magnitude[row] / |row|."""

    L: torch.Tensor  # out x r, float32
    R: torch.Tensor  # r x in, float32
    scale: float
    magnitude: torch.Tensor | None = None  # out, float32


def load_factors(ad: Adapter, up: LoraUpdate, device: str = "cpu") -> Factors:
    """The factors of `up` from adapter `ad`, in float32 on `device`, oriented as rows x rank and
    rank x columns of the tensor they update (transposed for embeddings and fan_in_fan_out)."""
    A = ad.get(up.A).to(device, torch.float32)
    B = ad.get(up.B).to(device, torch.float32)
    L, R = (A.T.contiguous(), B.T.contiguous()) if (up.embedding or up.fan_in_fan_out) else (B, A)
    mag = None if up.magnitude is None else ad.get(up.magnitude).to(device, torch.float32).reshape(-1)
    return Factors(L, R, up.scale, mag)


def apply_factors(block: torch.Tensor, r0: int, factors: list[Factors]) -> torch.Tensor:
    """Apply `factors` in order, in place, to `block` = rows r0.. of a tensor (float32, rows x in).

    Rows are independent (LoRA adds a row of L times R; DoRA rescales a row by its own norm), so
    blocks of rows merge to exactly what PEFT's merge of the whole tensor gives in float32.
    """
    r1 = r0 + block.shape[0]
    for f in factors:
        block.addmm_(f.L[r0:r1], f.R, alpha=f.scale)
        if f.magnitude is not None:
            block.mul_((f.magnitude[r0:r1] / torch.linalg.norm(block, dim=1)).view(-1, 1))
    return block
