"""Evaluation outputs: perplexity, merge equivalence, tokenizer statistics, per-model summary, plots.

perplexity
    Sliding-window perplexity (the Hugging Face recipe: windows of `max_length` tokens moved by
    `stride`, each token scored once, with as much left context as its window gives), computed
    exactly: every token after the first is predicted once, from the tokens before it in the
    first window that reaches it (the recipe's `num_valid_tokens - 1` count is off by one for
    overlapping windows; we count the tokens scored). Also bits per character, which compares
    models with different tokenizers (perplexity per token does not).

equivalence
    The merge's proof: the merged model against base + adapters *unmerged* (PEFT; every adapter
    but the last merged in float32, the last live), both computed in float32 on fixed prompts.
    Reports max and mean |delta logit| and top-1 agreement. A float32 merge must agree within
    `tolerance` (default 1e-3). A float16/bfloat16 merge cannot: its weights are rounded. We
    measure that rounding instead of guessing it: the unmerged model is merged in float32 and
    every tensor rounded to the dtype the merged files store it in (the *rounding floor* is how far
    that moves the logits). A correct merge is that rounded model up to an occasional last-bit
    difference, so it passes when max |delta| <= tolerance + 2 x floor. A missed or mis-scaled
    delta, a wrong row order or a corrupted tensor moves logits far more than rounding does.

tokenizer-stats
    Characters per token (and tokens per character) of the base and the merged tokenizer on a
    text, overall and split into Chinese and other lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import unicodedata
from pathlib import Path
from typing import Sequence

from .errors import LlamaforgeError
from . import defaults as D
from .fsutil import atomic_file, guard_output, json_of_kind, read_json, read_text, require_dir, require_file, write_json

log = logging.getLogger(__name__)

# the "llamaforge" value of each result file written here (by which a later run knows it as its own)
PERPLEXITY, EQUIVALENCE, TOKENIZER_STATS, SUMMARY, GGUF_QUALITY = (
    "perplexity", "equivalence", "tokenizer_stats", "summary", "gguf_quality")

DEFAULT_TOLERANCE = D.EQUIVALENCE_TOLERANCE


def _guard(output, kind: str, inputs) -> None:
    """An evaluation output must not overwrite an input, nor a file that is not llamaforge's result of
    the same kind (its "llamaforge" value)."""
    if output:
        guard_output(output, "json", inputs, own=json_of_kind(kind))


def _eval_text(path: str | os.PathLike | None, what: str) -> tuple[str, str]:
    """(text, name for the result) of a UTF-8 text file; None: the bundled Chinese + English sample."""
    if path is None:
        from .tokenizer import bundled_text

        return bundled_text("eval_text.txt"), "llamaforge/data/eval_text.txt"
    text = read_text(path, what)
    if not text.strip():
        raise LlamaforgeError(f"the {what} is empty", Path(path), "give a file with some text")
    return text, os.fspath(path)


# ---------------------------------------------------------------------------------------------
# Perplexity


def sliding_window_nll(model, ids: Sequence[int], max_length: int, stride: int, device: str = "cpu") -> dict:
    """Summed negative log-likelihood (nats) of ids[1:], windows of `max_length` moved by `stride`.

    Window k covers ids[k*stride : k*stride + max_length] and scores the tokens no earlier window
    reached, each from the tokens before it inside the window. Without overlap (stride =
    max_length) the first token of each later window has no context and is not scored.
    """
    import torch

    if max_length < 2:
        raise LlamaforgeError(f"max_length is {max_length}", None, "give a window of at least 2 tokens")
    if not 1 <= stride <= max_length:
        raise LlamaforgeError(f"stride is {stride} with max_length {max_length}", None,
                              "give 1 <= stride <= max_length (stride = max_length: no overlap)")
    n = len(ids)
    if n < 2:
        raise LlamaforgeError("the text is one token long; nothing to score", None, "give a longer text")
    all_ids = torch.tensor(ids, dtype=torch.long)
    nll, count, windows, prev_end = 0.0, 0, 0, 1  # token 0 (BOS) is never predicted
    with torch.inference_mode():
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            if end > prev_end:
                window = all_ids[begin:end].unsqueeze(0).to(device)
                logits = model(input_ids=window).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                # absolute positions scored here; a window's first token has no context in it (stride =
                # max_length), so it goes unscored, as in the Hugging Face recipe
                targets = torch.arange(max(prev_end, begin + 1), end)
                rel = (targets - begin).to(device)
                picked = logp[rel - 1, all_ids[targets].to(device)]
                nll -= float(picked.double().sum())
                count += len(targets)
                windows += 1
                prev_end = end
            if end == n:
                break
    return {"nll_sum": nll, "scored_tokens": count, "windows": windows}


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike | None = None,
               output: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
               max_length: int | None = None, stride: int = D.PERPLEXITY_STRIDE, device: str = "auto", dtype: str | None = "auto",
               echo=print) -> dict:
    """Perplexity of `model` on a UTF-8 text (the whole file as one sequence, BOS first; default:
    the bundled sample)."""
    from .generate import load_model

    _guard(output, PERPLEXITY, [("model folder", model), ("text file", text_file), ("tokenizer folder", tokenizer)])
    text, text_name = _eval_text(text_file, "perplexity text")
    loaded = load_model(model, (), tokenizer, device, dtype, echo=echo)
    m, dev, dt, context = loaded.model, loaded.device, loaded.dtype, loaded.context_length
    ids = loaded.tokenizer(text.rstrip("\n")).input_ids
    window = int(max_length or context)
    if window > context:
        log.warning("max_length %d exceeds the model's context %d", window, context)
    stride = min(int(stride), window)
    echo(f"{model}: {len(ids)} tokens, window {window}, stride {stride}, {dt} on {dev}")
    r = sliding_window_nll(m, ids, window, stride, dev)
    chars = len(text.rstrip("\n"))
    mean = r["nll_sum"] / r["scored_tokens"]
    if not math.isfinite(mean):
        raise LlamaforgeError(f"the model's logits are not finite (mean negative log-likelihood {mean}): its perplexity "
                              "is undefined", model, "rebuild the model; check its weights and adapters for NaN or "
                              "infinite values (evaluate.py equivalence shows where they differ)")
    result = {
        "llamaforge": PERPLEXITY,
        "model": os.fspath(model),
        "tokenizer": loaded.sources["tokenizer"],
        "text": text_name,
        "characters": chars,
        "tokens": len(ids),
        "scored_tokens": r["scored_tokens"],
        "max_length": window,
        "stride": stride,
        "windows": r["windows"],
        "dtype": str(dt).replace("torch.", ""),
        "nll_sum": r["nll_sum"],
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_character": r["nll_sum"] / math.log(2) / chars,
    }
    echo(f"perplexity {result['perplexity']:.4f} ({result['bits_per_character']:.4f} bits per character) over "
         f"{r['scored_tokens']} tokens in {r['windows']} window(s)")
    if output:
        write_json(output, result)
    return result


# ---------------------------------------------------------------------------------------------
# Merge equivalence


def stored_dtypes(folder: str | os.PathLike) -> dict:
    """{tensor name: torch dtype} as the model folder's weight files store them (headers only)."""
    from .formats import ModelSource

    src = ModelSource(folder)
    try:
        return {k: src.info(k).dtype for k in src.keys()}
    finally:
        src.close()


def equivalence_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The fixed prompts: each instruction of the file (default: the bundled ones), in the inference template."""
    from .generate import TEMPLATES, read_examples

    if path is None:
        from .tokenizer import bundled_text

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
    import torch

    from .generate import (apply_adapters, base_vocab_size, check_model_config, inspect_adapters, load_causal_lm,
                           load_tokenizer,
                           plan_vocab, resolve_device)

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
    check_model_config(merged)
    check_model_config(base)
    dev = resolve_device(device)
    tok_dir = Path(tokenizer) if tokenizer else Path(merged)
    tok = load_tokenizer(tok_dir)
    merged_vocab = base_vocab_size(merged)
    infos = inspect_adapters(base, loras)
    # structural checks only: whether the chain is the right recipe is the merge's business
    sizes = plan_vocab(base_vocab_size(base), infos, None, allow_vocab_jump=True)
    if sizes[-1] != merged_vocab:
        raise LlamaforgeError(
            f"the merged model has {merged_vocab} embedding rows but base + adapters give {sizes[-1]} "
            f"({' -> '.join(map(str, sizes))})", Path(merged) / "config.json",
            "compare the merged model with the base and the adapters (in order) it was built from")
    plan_vocab(merged_vocab, [], len(tok), tok_dir, merged)
    dtypes = stored_dtypes(merged)
    reduced = sorted({str(t).replace("torch.", "") for t in dtypes.values()
                      if t in (torch.float16, torch.bfloat16)})
    prompts = equivalence_prompts(prompts_file)
    batch = [tok(p).input_ids for p in prompts]
    echo(f"equivalence: {merged} vs {base} + {len(infos)} adapter(s), {len(batch)} prompts "
         f"({sum(map(len, batch))} positions), float32 on {dev}; merged weights stored as "
         f"{', '.join(sorted({str(t).replace('torch.', '') for t in dtypes.values()}))}")

    ref = apply_adapters(load_causal_lm(base, torch.float32, "cpu"), infos, sizes).to(dev).float()
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
    model = load_causal_lm(merged, torch.float32, dev)
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


# ---------------------------------------------------------------------------------------------
# Tokenizer statistics


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F") and unicodedata.category(ch).startswith("L")


def _encoder(path: str | os.PathLike):
    """(encode function, vocabulary size) for a tokenizer folder or a SentencePiece model file."""
    p = Path(path)
    from .tokenizer import HF_FILES

    # Hugging Face files beside tokenizer.model: load it as inference does; tokenizer.model alone
    # (a Meta folder) or a bare model file: SentencePiece
    if p.is_dir() and any((p / f).is_file() for f in HF_FILES if f != "tokenizer.model"):
        from .generate import load_tokenizer

        tok = load_tokenizer(p)
        return (lambda s: tok(s, add_special_tokens=False).input_ids), len(tok)
    from .tokenizer import tokenizer_folder_model

    from .tokenizer import load_proto

    model = tokenizer_folder_model(require_file(p, "tokenizer") if p.is_file() else require_dir(p, "tokenizer folder"))
    import sentencepiece as spm

    proto = load_proto(model, "tokenizer.model")  # the clear error for a file that is no SentencePiece model
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp.encode, sp.get_piece_size()


def _counts(encode, lines: Sequence[str]) -> dict:
    chars = sum(len(s) for s in lines)
    tokens = sum(len(encode(s)) for s in lines)
    return {"tokens": tokens, "chars_per_token": chars / tokens if tokens else 0.0,
            "tokens_per_char": tokens / chars if chars else 0.0}


def tokenizer_stats(tokenizer: str | os.PathLike, base_tokenizer: str | os.PathLike,
                    text_file: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                    echo=print) -> dict:
    """Characters per token before (base) and after (merged) the vocabulary merge, line by line
    (default text: the bundled sample)."""
    _guard(output, TOKENIZER_STATS, [("tokenizer folder", tokenizer), ("base tokenizer", base_tokenizer),
                                     ("text file", text_file)])
    text, text_name = _eval_text(text_file, "tokenizer-stats text")
    lines = [s for s in text.splitlines() if s.strip()]
    enc_m, vocab_m = _encoder(tokenizer)
    enc_b, vocab_b = _encoder(base_tokenizer)
    groups = {"chinese": [], "other": []}
    for s in lines:
        letters = [c for c in s if not c.isspace()]
        cjk = sum(_is_cjk(c) for c in letters)
        groups["chinese" if letters and cjk / len(letters) >= 0.3 else "other"].append(s)

    def block(ls):
        return {"lines": len(ls), "characters": sum(len(s) for s in ls),
                "base": _counts(enc_b, ls), "merged": _counts(enc_m, ls)}

    overall = block(lines)
    result = {
        "llamaforge": TOKENIZER_STATS,
        "tokenizer": os.fspath(tokenizer), "base_tokenizer": os.fspath(base_tokenizer), "text": text_name,
        "vocab": {"base": vocab_b, "merged": vocab_m},
        **overall,
        "token_reduction": 1 - overall["merged"]["tokens"] / overall["base"]["tokens"] if overall["base"]["tokens"] else 0.0,
        "by_script": {k: block(v) for k, v in groups.items() if v},
    }
    echo(f"characters per token: base {overall['base']['chars_per_token']:.3f} ({vocab_b} tokens), merged "
         f"{overall['merged']['chars_per_token']:.3f} ({vocab_m} tokens); {result['token_reduction']:.1%} fewer tokens")
    for k, b in result["by_script"].items():
        echo(f"  {k} ({b['lines']} lines): base {b['base']['chars_per_token']:.3f}, merged {b['merged']['chars_per_token']:.3f}")
    if output:
        write_json(output, result)
    return result


# ---------------------------------------------------------------------------------------------
# Summary and plots


def summarize(model: str, output: str | os.PathLike | None = None, predictions: str | os.PathLike | None = None,
              perplexity_json: str | os.PathLike | None = None, equivalence_json: str | os.PathLike | None = None,
              tokenizer_stats_json: str | os.PathLike | None = None, echo=print) -> dict:
    """One JSON per model with the headline numbers of each evaluation output."""
    _guard(output, SUMMARY, [("predictions file", predictions), ("perplexity file", perplexity_json),
                    ("equivalence file", equivalence_json), ("tokenizer-stats file", tokenizer_stats_json)])
    out: dict = {"llamaforge": SUMMARY, "model": model}
    if predictions:
        preds = read_json(predictions, "predictions file")
        if not isinstance(preds, list) or not all(isinstance(p, dict) and isinstance(p.get("output", ""), str)
                                                  for p in preds):
            raise LlamaforgeError("predictions file is not a JSON list of records with a text output", predictions,
                                  "rebuild it with scripts/inference.py")
        lengths = [len(p.get("output", "")) for p in preds]
        out["predictions"] = {"count": len(preds), "empty_outputs": sum(n == 0 for n in lengths),
                              "mean_output_chars": sum(lengths) / len(lengths) if lengths else 0.0,
                              "file": os.fspath(predictions)}
    if perplexity_json:
        p = _result(perplexity_json, "perplexity", ("perplexity", "bits_per_character", "tokens", "characters",
                                                    "max_length", "stride"))
        out["perplexity"] = {k: p[k] for k in ("perplexity", "bits_per_character", "tokens", "characters", "max_length",
                                                "stride")}
    if equivalence_json:
        e = _result(equivalence_json, "equivalence", ("passed", "max_abs_diff", "mean_abs_diff", "top1_agreement",
                                                      "allowed", "tolerance", "rounding_floor", "merged_dtypes"))
        out["equivalence"] = {k: e[k] for k in ("passed", "max_abs_diff", "mean_abs_diff", "top1_agreement", "allowed",
                                                "tolerance", "rounding_floor", "merged_dtypes")}
    if tokenizer_stats_json:
        t = _result(tokenizer_stats_json, "tokenizer_stats", ("vocab", "base", "merged", "token_reduction", "by_script"))
        try:
            out["tokenizer"] = {
                "vocab": t["vocab"],
                "chars_per_token": {"base": t["base"]["chars_per_token"], "merged": t["merged"]["chars_per_token"]},
                "tokens_per_char": {"base": t["base"]["tokens_per_char"], "merged": t["merged"]["tokens_per_char"]},
                "token_reduction": t["token_reduction"],
                "by_script": {k: {"base": v["base"]["tokens_per_char"], "merged": v["merged"]["tokens_per_char"]}
                              for k, v in t["by_script"].items()},
            }
        except (KeyError, TypeError, AttributeError):
            raise LlamaforgeError("not a tokenizer_stats result of llamaforge (its base/merged counts are missing)",
                                  tokenizer_stats_json, "rebuild it with scripts/evaluate.py tokenizer-stats") from None
    if output:
        write_json(output, out)
    echo(json.dumps(out, ensure_ascii=False, indent=2))
    return out


def _result(path, kind: str, keys) -> dict:
    """An evaluation output of `kind` (a JSON object with `keys`), or one clear error."""
    data = read_json(path, f"{kind} file")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise LlamaforgeError(f"not a {kind} result of llamaforge (no {missing[0]!r})", path,
                              f"rebuild it with scripts/evaluate.py {kind.replace('_', '-')}")
    return data


def _bar_labels(ax, bars, fmt):
    for b in bars:
        ax.annotate(fmt.format(b.get_height()), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def plot(summaries: Sequence[str | os.PathLike], tokens_per_char: str | os.PathLike | None = None,
         perplexity_png: str | os.PathLike | None = None, equivalence_png: str | os.PathLike | None = None) -> list[str]:
    """Bar charts over every model's summary.json; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for png in (tokens_per_char, perplexity_png, equivalence_png):
        if png:
            guard_output(png, "png", [("summary file", p) for p in summaries])
    data = [_result(p, "summary", ("model",)) for p in summaries]
    if not data:
        raise LlamaforgeError("no summary to plot", None, "evaluate at least one model (evaluate: true in config.yaml)")
    try:
        rendered = _render(plt, data, tokens_per_char, perplexity_png, equivalence_png)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise LlamaforgeError(f"a summary file does not hold what the plots need ({type(e).__name__}: {e})",
                              summaries[0] if len(summaries) == 1 else None,
                              "rebuild eval/*/summary.json with scripts/evaluate.py summary") from None
    for path, png in rendered:  # every plot drawn before the first is written
        with atomic_file(path, "wb") as f:
            f.write(png)
    return [os.fspath(path) for path, _ in rendered]


def _render(plt, data, tokens_per_char, perplexity_png, equivalence_png) -> list[tuple[str, bytes]]:
    """(path, PNG bytes) of each plot asked for, drawn in memory."""
    import io

    names = [d["model"] for d in data]
    written = []

    def save(fig, path, layout=True):
        if layout:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120, metadata={"Software": "llamaforge"})
        plt.close(fig)
        written.append((path, buf.getvalue()))

    if tokens_per_char:
        groups = []  # (label, base values, merged values)
        scripts = sorted({k for d in data for k in d.get("tokenizer", {}).get("by_script", {})})
        for key in ["all"] + scripts:
            base, merged = [], []
            for d in data:
                t = d.get("tokenizer", {})
                v = t.get("tokens_per_char") if key == "all" else t.get("by_script", {}).get(key)
                base.append(v["base"] if v else 0.0)
                merged.append(v["merged"] if v else 0.0)
            groups.append((key, base, merged))
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 3.6), squeeze=False)
        width = 0.38
        for ax, (key, base, merged) in zip(axes[0], groups):
            x = range(len(names))
            b1 = ax.bar([i - width / 2 for i in x], base, width, label="base tokenizer", color="#9aa5b1")
            b2 = ax.bar([i + width / 2 for i in x], merged, width, label="merged tokenizer", color="#2f6fb0")
            _bar_labels(ax, b1, "{:.2f}")
            _bar_labels(ax, b2, "{:.2f}")
            ax.set_xticks(list(x), names, rotation=20)
            ax.set_title(f"{key} text")
            ax.set_ylabel("tokens per character (lower is better)")
            ax.margins(y=0.15)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        save(fig, tokens_per_char, layout=False)

    if perplexity_png:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.6))
        ppl = [d.get("perplexity", {}).get("perplexity", 0.0) for d in data]
        bpc = [d.get("perplexity", {}).get("bits_per_character", 0.0) for d in data]
        _bar_labels(a1, a1.bar(names, ppl, color="#b0552f"), "{:.1f}")
        a1.set_ylabel("perplexity per token")
        a1.set_title("perplexity (per own token)")
        _bar_labels(a2, a2.bar(names, bpc, color="#5f8f3e"), "{:.2f}")
        a2.set_ylabel("bits per character")
        a2.set_title("bits per character (comparable)")
        for a in (a1, a2):
            a.tick_params(axis="x", rotation=20)
            a.margins(y=0.15)
        save(fig, perplexity_png)

    if equivalence_png:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        checked = [d for d in data if "equivalence" in d]  # a model without adapters has no merge to check
        if checked:
            labels = [d["model"] for d in checked]
            diffs = [max(d["equivalence"]["max_abs_diff"], 1e-12) for d in checked]
            allowed = [d["equivalence"]["allowed"] for d in checked]
            colors = ["#3e8f5f" if d["equivalence"]["passed"] else "#c0392b" for d in checked]
            bars = ax.bar(labels, diffs, color=colors, label="max |Δ logit|")
            _bar_labels(ax, bars, "{:.1e}")
            ax.scatter(labels, allowed, marker="_", s=600, color="black", label="allowed", zorder=3)
            ax.set_yscale("log")
            ax.set_ylim(min(diffs + allowed) / 30, max(diffs + allowed) * 10)
        else:
            ax.text(0.5, 0.5, "no merged model to check", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("max |Δ logit|, merged vs unmerged")
        ax.set_title("merge equivalence (green = passed)")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=8)
        save(fig, equivalence_png)
    return written


# ---------------------------------------------------------------------------------------------
# The quality of each GGUF export, measured with llama.cpp itself


class _LlamaCppLM:
    """A llama.cpp model that answers `model(input_ids=...)` with `.logits`, as a Hugging Face one
    does (so the perplexity windows are exactly those of the Hugging Face perplexity)."""

    def __init__(self, path, n_ctx: int, threads: int):
        from .quantize import open_llama

        self.llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads or None)

    def __call__(self, input_ids):
        import types

        import torch

        ids = [int(i) for i in input_ids[0].tolist()]
        self.llm.reset()
        self.llm.eval(ids)
        return types.SimpleNamespace(logits=torch.tensor(self.llm.scores[: len(ids)], dtype=torch.float32)[None])

    def close(self):
        self.llm.close()


def _kl_top1(ref: Sequence, got: Sequence) -> tuple[float, float]:
    """Mean KL(ref || got) of the next-token distributions over every position, and top-1 agreement."""
    import torch

    kl, agree, n = 0.0, 0, 0
    for a, b in zip(ref, got):
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return kl / n, agree / n


def gguf_quality(model: str | os.PathLike, ggufs: Sequence[str | os.PathLike], output: str | os.PathLike,
                 text_file: str | os.PathLike | None = None, prompts_file: str | os.PathLike | None = None,
                 max_length: int | None = None, stride: int = D.PERPLEXITY_STRIDE, threads: int = 0,
                 echo=print) -> dict:
    """eval/{model}/gguf.json: per GGUF export, bits per weight, file size, llama.cpp's perplexity on
    the text (the windows of the Hugging Face perplexity), and its agreement with the Hugging Face
    model on the fixed prompts (top-1, mean KL divergence of the next-token distributions)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .generate import check_model_config, load_tokenizer
    from .quantize import bits_per_weight, fallbacks, tensor_types

    inputs = [("model folder", model), ("text", text_file), ("prompts file", prompts_file)]
    inputs += [("GGUF file", g) for g in ggufs]
    _guard(output, GGUF_QUALITY, inputs)
    if not ggufs:
        raise LlamaforgeError("no GGUF file to measure", None, "give --gguf FILE (repeatable)")
    _check_ggufs(model, ggufs)
    text, text_name = _eval_text(text_file, "text")
    check_model_config(model)
    tok = load_tokenizer(model)
    ids = tok(text).input_ids
    prompts = [tok(p).input_ids for p in equivalence_prompts(prompts_file)]
    hf = AutoModelForCausalLM.from_pretrained(os.fspath(model), dtype=torch.float32)
    hf.eval()
    window = int(max_length or getattr(hf.config, "max_position_embeddings", 2048))
    window = min(window, max(len(ids), 2))
    ref_nll = sliding_window_nll(hf, ids, window, min(stride, window))
    ref_logits = _logits(hf, prompts, "cpu")
    del hf
    n_ctx = max(window, max(len(p) for p in prompts))
    rows = []
    for g in ggufs:
        g = Path(g)
        bpw, nbytes, weights = bits_per_weight(g)
        try:
            lm = _LlamaCppLM(g, n_ctx, threads)
        except (ValueError, RuntimeError, OSError) as e:  # llama-cpp-python: "Failed to load model from file"
            raise LlamaforgeError(f"llama.cpp cannot load this GGUF ({str(e)[:120]}; its log is above)", g,
                                  f"export it again: scripts/export_gguf.py --model {model}") from None
        try:
            nll = sliding_window_nll(lm, ids, window, min(stride, window))
            got = [lm(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        finally:
            lm.close()
        kl, top1 = _kl_top1(ref_logits, got)
        if not (math.isfinite(nll["nll_sum"]) and math.isfinite(kl)):
            raise LlamaforgeError("llama.cpp's logits of this GGUF are not finite (NaN or infinity)", g,
                                  f"export it again from a sound model: scripts/export_gguf.py --model {model}")
        outtype = _outtype_of(g)
        types = sorted({t for t, _ in tensor_types(g).values()})
        row = {"file": g.name, "outtype": outtype, "size_bytes": g.stat().st_size, "bits_per_weight": bpw,
               "weights": weights, "types": types,
               "perplexity": math.exp(nll["nll_sum"] / nll["scored_tokens"]),
               "kl_mean": kl, "top1_agreement": top1, "fallbacks": len(fallbacks(g, outtype))}
        rows.append(row)
        echo(f"{g.name}: {bpw:.2f} bits/weight, perplexity {row['perplexity']:.4f}, KL {kl:.5f}, "
             f"top-1 {top1:.4f}")
    result = {
        "llamaforge": GGUF_QUALITY, "model": os.fspath(model), "text": text_name,
        "window": window, "stride": min(stride, window), "scored_tokens": ref_nll["scored_tokens"],
        "prompt_positions": sum(len(p) for p in prompts),
        "reference": {"what": "the Hugging Face model, float32", "perplexity":
                      math.exp(ref_nll["nll_sum"] / ref_nll["scored_tokens"])},
        "exports": rows,
    }
    write_json(output, result)
    return result


def _check_ggufs(model, ggufs) -> None:
    """Each GGUF is a readable GGUF of `model` (its architecture, tensors and vocabulary; see
    export.check_gguf_of), checked before any model is loaded."""
    from .export import check_gguf_of, open_gguf, open_model
    from .fsutil import require_regular_file
    from .gguf_file import load_gguf

    gguf = load_gguf()
    m = open_model(model)
    try:
        for g in ggufs:
            g = Path(g)
            fix = f"give a GGUF export of this model: scripts/export_gguf.py --model {model}"
            require_regular_file(g, "the GGUF file", fix)
            check_gguf_of(gguf, open_gguf(gguf, g, fix), g, m, fix, what="the GGUF")
    finally:
        m.src.close()


def _outtype_of(path: Path) -> str:
    """The --outtype a GGUF was made as (its general.file_type, e.g. MOSTLY_Q4_K_M -> q4_k_m)."""
    import gguf

    from .quantize import gguf_file_type

    ft = gguf_file_type(gguf.GGUFReader(path))
    try:
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type {ft}"


def plot_gguf_quality(qualities: Sequence[str | os.PathLike], output: str | os.PathLike) -> str:
    """eval/plots/gguf_quality.png: llama.cpp perplexity and mean KL against bits per weight, one point
    per GGUF export, one line per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guard_output(output, "png", [("GGUF quality file", p) for p in qualities])
    data = [_result(p, "gguf_quality", ("model", "exports")) for p in qualities]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    try:
        for d in data:
            rows = sorted(d["exports"], key=lambda r: r["bits_per_weight"])
            x = [r["bits_per_weight"] for r in rows]
            label = Path(d["model"]).name
            a1.plot(x, [r["perplexity"] for r in rows], marker="o", label=label)
            a2.plot(x, [max(r["kl_mean"], 1e-12) for r in rows], marker="o", label=label)
            for r in rows:
                a1.annotate(r["outtype"], (r["bits_per_weight"], r["perplexity"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
                a2.annotate(r["outtype"], (r["bits_per_weight"], max(r["kl_mean"], 1e-12)), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
            ref = d.get("reference", {}).get("perplexity")
            if ref:
                a1.axhline(ref, linestyle=":", linewidth=1, color="gray")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        plt.close(fig)
        raise LlamaforgeError(f"a GGUF quality file does not hold what the plot needs ({type(e).__name__}: {e})",
                              None, "rebuild eval/*/gguf.json with scripts/evaluate.py gguf-quality") from None
    a1.set_xlabel("bits per weight")
    a1.set_ylabel("llama.cpp perplexity (dotted: Hugging Face)")
    a1.set_title("perplexity")
    a2.set_xlabel("bits per weight")
    a2.set_ylabel("mean KL vs the Hugging Face model")
    a2.set_yscale("log")
    a2.set_title("divergence from the merged model")
    a1.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": "llamaforge"})
    plt.close(fig)
    with atomic_file(output, "wb") as f:
        f.write(buf.getvalue())
    return os.fspath(output)
