"""The multiple-choice table of a model's summary.json, and the plot of accuracy against bits per
weight over every model's summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ...errors import LlamaforgeError
from ...files.reading import read_json
from .run import MULTIPLE_CHOICE

SCORES = ("acc", "acc_norm", "acc_bytes", "first_token_acc")


def set_name(path: str | os.PathLike) -> str:
    """The set of eval/{model}/mc/{set}.json or {set}.{gguf type}.json (set names have no dot)."""
    return Path(path).name.split(".")[0]


def mc_table(files: Sequence[str | os.PathLike]) -> dict:
    """{set: {"questions", "chance", "merged": {scores}, "exports": [{file, bits_per_weight, scores}]}}
    from `multiple_choice` summaries (the merged model's and each GGUF export's)."""
    table: dict = {}
    for f in files:
        d = read_json(f, "multiple-choice result")
        try:
            if not isinstance(d, dict) or d.get("llamaforge") != MULTIPLE_CHOICE:
                raise KeyError("llamaforge")
            row = {k: d["scores"][k] for k in SCORES}
            entry = table.setdefault(set_name(f), {"questions": d["questions"], "chance": d["chance"],
                                                   "merged": None, "exports": []})
            if d["scorer"]["kind"] == "huggingface":
                entry["merged"] = row
            else:
                entry["exports"].append({"file": Path(d["scorer"]["gguf"]).name,
                                         "bits_per_weight": d["scorer"]["bits_per_weight"], **row})
        except (KeyError, TypeError) as e:
            raise LlamaforgeError(f"not a multiple-choice result of llamaforge (no {e})", f,
                                  "rebuild it with scripts/evaluate.py multiple-choice") from None
    for entry in table.values():
        entry["exports"].sort(key=lambda r: r["bits_per_weight"])
    return table


def plot_multiple_choice(summaries: Sequence[str | os.PathLike], output: str | os.PathLike) -> str:
    """eval/plots/multiple_choice.png: per model and set, acc and first-token accuracy of each GGUF
    export against its bits per weight; the merged model's acc dotted, chance in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...files.guard import guard_output
    from ..report import write_figure  # (its module registers the PNG ownership test)

    guard_output(output, "png", [("summary file", p) for p in summaries])
    data = [read_json(p, "summary file") for p in summaries]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    chance = []
    try:
        for d in data:
            for name, t in sorted(d.get("multiple_choice", {}).items()):
                label = f"{d['model']} / {name}"
                rows = t["exports"]
                x = [r["bits_per_weight"] for r in rows]
                for ax, key in ((a1, "acc"), (a2, "first_token_acc")):
                    line, = ax.plot(x, [r[key] for r in rows], marker="o", label=label)
                    if t["merged"] is not None:
                        ax.axhline(t["merged"][key], linestyle=":", linewidth=1, color=line.get_color())
                    for r in rows:
                        ax.annotate(r["file"].rsplit("-", 1)[-1].removesuffix(".gguf"), (r["bits_per_weight"], r[key]),
                                    fontsize=7, textcoords="offset points", xytext=(3, 3))
                chance.append(t["chance"])
    except (KeyError, TypeError, AttributeError) as e:
        plt.close(fig)
        raise LlamaforgeError(f"a summary file does not hold the multiple-choice table ({type(e).__name__}: {e})", None,
                              "rebuild eval/*/summary.json with scripts/evaluate.py summary --multiple-choice") from None
    for ax, title in ((a1, "lm-evaluation-harness acc"), (a2, "first-token accuracy (Chinese-LLaMA-Alpaca)")):
        for c in sorted(set(chance)):
            ax.axhline(c, linewidth=1, color="#bbbbbb")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("accuracy (dotted: merged model)")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=8)
    else:
        a1.text(0.5, 0.5, "no GGUF export scored", ha="center", va="center", transform=a1.transAxes)
    return write_figure(plt, fig, output)
