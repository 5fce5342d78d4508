"""Merge equivalence: the merge's proof.

The merged model against base + adapters *unmerged* (PEFT; every adapter but the last merged in
float32, the last live), both computed in float32 on fixed prompts. Reports max and mean |delta
logit| and top-1 agreement. A float32 merge must agree within `tolerance` (default 1e-3). A
float16/bfloat16 merge cannot: its weights are rounded. We measure that rounding instead of
guessing it: the unmerged model is merged in float32 and every tensor rounded to the dtype the
merged files store it in (the *rounding floor* is how far that moves the logits). A correct merge
is that rounded model up to an occasional last-bit difference, so it passes when max |delta| <=
tolerance + 2 x floor. A missed or mis-scaled delta, a wrong row order or a corrupted tensor moves
logits far more than rounding does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from ..errors import LlamaforgeError
from ..files.atomic import write_json
from ..model import ModelFolder
from .common import DEFAULT_TOLERANCE, EQUIVALENCE, _guard, log


def stored_dtypes(folder: str | os.PathLike | ModelFolder) -> dict:
    """{tensor name: torch dtype} as the model folder's weight files store them (headers only).
    `folder`: a ModelFolder (its tensor index reused, left open) or a path."""
    if isinstance(folder, ModelFolder):
        src = folder.tensors()
        return {k: src.info(k).dtype for k in src.keys()}
    from ..formats.source import ModelSource

    src = ModelSource(folder)
    try:
        return {k: src.info(k).dtype for k in src.keys()}
    finally:
        src.close()


def equivalence_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The fixed prompts: each instruction of the file (default: the bundled ones), in the inference template."""
    from ..generate import TEMPLATES, read_examples

    if path is None:
        from ..tokenizer import bundled_text

        examples = read_examples("eval_prompts.txt", bundled_text("eval_prompts.txt"))
    else:
        examples = read_examples(path)
    return [TEMPLATES["alpaca"].prompt(ex.instruction, ex.input) for ex in examples]


def _logits(model, batch: Sequence[list[int]], device: str) -> list:
    import torch

    out = []
    with torch.inference_mode():
        for ids in batch:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def _compare(a: Sequence, b: Sequence) -> dict:
    max_abs, total, n, agree, positions = 0.0, 0.0, 0, 0, 0
    for x, y in zip(a, b):
        d = (x - y).abs()
        m = float(d.max())
        # NaN is sticky: Python's max(0.0, nan) is 0.0, which would pass a model full of NaN
        max_abs = math.nan if math.isnan(m) or math.isnan(max_abs) else max(max_abs, m)
        total += float(d.double().sum())
        n += d.numel()
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        positions += x.shape[0]
    return {"max_abs_diff": max_abs, "mean_abs_diff": total / n, "top1_agreement": agree / positions,
            "positions": positions}


def equivalence(merged: str | os.PathLike, base: str | os.PathLike, loras: Sequence[str | os.PathLike],
                output: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                prompts_file: str | os.PathLike | None = None, tolerance: float = DEFAULT_TOLERANCE,
                device: str = "auto", echo=print) -> dict:
    """Compare the merged model with base + adapters unmerged; raise LlamaforgeError when it fails.

    The result is written to `output` (when given) before the error is raised, for inspection.
    """
    from ..generate import check_model_config

    _guard(output, EQUIVALENCE, [("merged model folder", merged), ("base model folder", base), ("tokenizer folder", tokenizer),
                    ("prompts file", prompts_file)] + [("adapter folder", p) for p in loras])
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise LlamaforgeError(f"the equivalence tolerance is {tolerance}; it must be a positive finite number", None,
                              "set eval.equivalence.tolerance in config.yaml (or --tolerance), e.g. 0.001")
    if not loras:
        raise LlamaforgeError("no adapter given: there is no merge to check", merged,
                              "give the adapters the model was merged from (--lora, in order)")
    if tolerance <= 0:
        raise LlamaforgeError(f"tolerance is {tolerance}", None, "give a positive tolerance, e.g. 1e-3")
    # each model folder described once (config.json, generation config, tensor index), passed down
    with check_model_config(merged) as mm, check_model_config(base) as mb:
        return _equivalence(mm, mb, merged, base, loras, output, tokenizer, prompts_file, tolerance, device, echo)


def _equivalence(mm: ModelFolder, mb: ModelFolder, merged, base, loras, output, tokenizer, prompts_file,
                 tolerance: float, device: str, echo) -> dict:
    import torch

    from ..generate import (
        apply_adapters,
        base_vocab_size,
        inspect_adapters,
        load_causal_lm,
        load_tokenizer,
        plan_vocab,
        resolve_device,
    )

    dev = resolve_device(device)
    tok_dir = Path(tokenizer) if tokenizer else Path(merged)
    tok = load_tokenizer(tok_dir)
    merged_vocab = base_vocab_size(mm)
    infos = inspect_adapters(mb, loras)
    # structural checks only: whether the chain is the right recipe is the merge's business
    sizes = plan_vocab(base_vocab_size(mb), infos, None, allow_vocab_jump=True)
    if sizes[-1] != merged_vocab:
        raise LlamaforgeError(
            f"the merged model has {merged_vocab} embedding rows but base + adapters give {sizes[-1]} "
            f"({' -> '.join(map(str, sizes))})", Path(merged) / "config.json",
            "compare the merged model with the base and the adapters (in order) it was built from")
    plan_vocab(merged_vocab, [], len(tok), tok_dir, merged)
    dtypes = stored_dtypes(mm)
    reduced = sorted({str(t).replace("torch.", "") for t in dtypes.values()
                      if t in (torch.float16, torch.bfloat16)})
    prompts = equivalence_prompts(prompts_file)
    batch = [tok(p).input_ids for p in prompts]
    echo(f"equivalence: {merged} vs {base} + {len(infos)} adapter(s), {len(batch)} prompts "
         f"({sum(map(len, batch))} positions), float32 on {dev}; merged weights stored as "
         f"{', '.join(sorted({str(t).replace('torch.', '') for t in dtypes.values()}))}")

    ref = apply_adapters(load_causal_lm(mb, torch.float32, "cpu"), infos, sizes).to(dev).float()
    unmerged = _logits(ref, batch, dev)
    with ref.disable_adapter():
        without_last = _logits(ref, batch, dev)
    effect = _compare(unmerged, without_last)["max_abs_diff"]
    floor = 0.0
    vs_rounded = None
    if reduced:
        ref = ref.merge_and_unload()
        with torch.no_grad():
            for name, t in list(ref.state_dict().items()):
                dt = dtypes.get(name)
                if dt is not None and dt != torch.float32 and t.is_floating_point():
                    t.copy_(t.to(dt).to(t.dtype))
        rounded = _logits(ref, batch, dev)
        floor = _compare(rounded, unmerged)["max_abs_diff"]
    del ref
    model = load_causal_lm(mm, torch.float32, dev)
    got = _logits(model, batch, dev)
    del model
    if reduced:
        vs_rounded = _compare(got, rounded)["max_abs_diff"]
    cmp = _compare(got, unmerged)
    allowed = tolerance + 2 * floor
    passed = cmp["max_abs_diff"] <= allowed
    result = {
        "llamaforge": EQUIVALENCE,
        "merged": os.fspath(merged), "base": os.fspath(base), "loras": [os.fspath(p) for p in loras],
        "tokenizer": os.fspath(tok_dir), "prompts": len(batch), "positions": cmp["positions"],
        "vocab": merged_vocab, "merged_dtypes": reduced or ["float32"], "compute_dtype": "float32",
        "max_abs_diff": cmp["max_abs_diff"], "mean_abs_diff": cmp["mean_abs_diff"],
        "top1_agreement": cmp["top1_agreement"],
        "rounding_floor": floor, "max_abs_diff_vs_rounded": vs_rounded,
        "last_adapter_effect": effect,
        "tolerance": tolerance, "allowed": allowed, "passed": passed,
        "rule": "max_abs_diff <= tolerance + 2 * rounding_floor",
    }
    echo(f"max |delta logit| {cmp['max_abs_diff']:.3e} (allowed {allowed:.3e}: tolerance {tolerance:g} + 2 x rounding "
         f"floor {floor:.3e}), mean {cmp['mean_abs_diff']:.3e}, top-1 agreement {cmp['top1_agreement']:.4f}; "
         f"the last adapter alone moves logits by {effect:.3e}")
    if effect <= allowed:
        log.warning("the last adapter changes logits by %.3e only, within the tolerance: this check cannot tell a "
                    "merge that forgot it", effect)
    if output:
        write_json(output, result)
    if not passed:
        raise LlamaforgeError(
            f"merge check FAILED: max |delta logit| {cmp['max_abs_diff']:.4g} > allowed {allowed:.4g} between the merged "
            f"model and base + adapters (top-1 agreement {cmp['top1_agreement']:.4f})", merged,
            "rebuild the merged model (delete it and rerun the merge); if it persists, check the adapters' order and "
            "that the base is the one they were trained on")
    return result
