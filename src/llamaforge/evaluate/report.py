"""Summaries and plots: the per-model summary.json of the evaluation outputs, and the matplotlib
charts over the summaries and over the GGUF quality tables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import LlamaforgeError
from ..files.atomic import atomic_file, write_json
from ..files.guard import guard_output, owned_by
from ..files.reading import read_json
from .common import SUMMARY, _guard


@owned_by("png", "llamaforge plot")
def _png_is_own(path: Path) -> bool:
    """A PNG whose `Software` text chunk names llamaforge (set by its plots)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    return data.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00llamaforge" in data


def summarize(model: str, output: str | os.PathLike | None = None, predictions: str | os.PathLike | None = None,
              perplexity_json: str | os.PathLike | None = None, equivalence_json: str | os.PathLike | None = None,
              tokenizer_stats_json: str | os.PathLike | None = None, echo=print,
              multiple_choice: Sequence[str | os.PathLike] = ()) -> dict:
    """One JSON per model with the headline numbers of each evaluation output."""
    _guard(output, SUMMARY, [("predictions file", predictions), ("perplexity file", perplexity_json),
                    ("equivalence file", equivalence_json), ("tokenizer-stats file", tokenizer_stats_json)]
           + [("multiple-choice file", f) for f in multiple_choice])
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
    if multiple_choice:
        from .mc.table import mc_table

        out["multiple_choice"] = mc_table(multiple_choice)
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


def plot_gguf_quality(qualities: Sequence[str | os.PathLike], output: str | os.PathLike) -> str:
    """eval/plots/gguf_quality.png: llama.cpp perplexity and mean KL against bits per weight, one point
    per GGUF export, one line per model."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guard_output(output, "png", [("GGUF quality file", p) for p in qualities])
    data = [_result(p, "gguf_quality", ("model", "exports")) for p in qualities]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    try:
        # KL from the F16 over the text where every file has it, else from the Hugging Face model
        kl_key = "kl_f16" if all(r.get("kl_f16") is not None for d in data for r in d["exports"]) else "kl_mean"
        for d in data:
            # without and with an importance matrix: two lines per model, side by side
            for series, marker in (([r for r in d["exports"] if not r.get("imatrix")], "o"),
                                   ([r for r in d["exports"] if r.get("imatrix")], "s")):
                if not series:
                    continue
                rows = sorted(series, key=lambda r: r["bits_per_weight"])
                x = [r["bits_per_weight"] for r in rows]
                label = Path(d["model"]).name + (" (imatrix)" if marker == "s" else "")
                a1.plot(x, [r["perplexity"] for r in rows], marker=marker, label=label)
                a2.plot(x, [max(r[kl_key], 1e-12) for r in rows], marker=marker, label=label)
                for r in rows:
                    a1.annotate(r["outtype"], (r["bits_per_weight"], r["perplexity"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
                    a2.annotate(r["outtype"], (r["bits_per_weight"], max(r[kl_key], 1e-12)), fontsize=7,
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
    a2.set_ylabel("mean KL from the F16 GGUF (text)" if kl_key == "kl_f16" else "mean KL vs the Hugging Face model")
    a2.set_yscale("log")
    a2.set_title("divergence from the F16" if kl_key == "kl_f16" else "divergence from the merged model")
    a1.legend(fontsize=8)
    return write_figure(plt, fig, output)


def write_figure(plt, fig, output: str | os.PathLike) -> str:
    """Lay out `fig`, write it as a PNG marked as llamaforge's (whole or not at all), close it."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": "llamaforge"})
    plt.close(fig)
    with atomic_file(output, "wb") as f:
        f.write(buf.getvalue())
    return os.fspath(output)
