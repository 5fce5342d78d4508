#!/usr/bin/env python
"""Evaluation outputs: perplexity, merge equivalence, tokenizer statistics, per-model summary, plots.

  python scripts/evaluate.py perplexity --model merged/demo --text eval.txt --output eval/demo/perplexity.json
  python scripts/evaluate.py equivalence --merged merged/demo --base BASE --lora A --lora B --output eq.json
  python scripts/evaluate.py tokenizer-stats --tokenizer tokenizers/demo-alpaca --base-tokenizer BASE --text T --output F
  python scripts/evaluate.py summary --model demo --predictions P --perplexity P --equivalence E --tokenizer-stats T --output F
  python scripts/evaluate.py multiple-choice --model merged/demo --data mc.jsonl --output eval/demo/mc/x.json --items eval/demo/mc/x.jsonl
  python scripts/evaluate.py plot --summary eval/a/summary.json --summary eval/b/summary.json --tokens-per-char F.png ...
"""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Group, setup_logging, user_errors
from llamaforge.evaluate import DEFAULT_TOLERANCE

DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
TEXT_HELP = "UTF-8 text. Default: the bundled Chinese + English sample (llamaforge/data/eval_text.txt)."


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    setup_logging()


@main.command()
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder.")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Tokenizer folder. Default: the model folder.")
@click.option("--text", type=click.Path(dir_okay=False), help=TEXT_HELP)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSON result.")
@click.option("--max-length", type=click.IntRange(min=2), help="Window length in tokens. Default: the model's context.")
@click.option("--stride", default=D.PERPLEXITY_STRIDE, show_default=True, type=click.IntRange(min=1), help="Window step in tokens.")
@DEVICE
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Compute dtype; auto = float32 on the CPU, float16 on CUDA.")
def perplexity(model, tokenizer, text, output, max_length, stride, device, dtype):
    """Sliding-window perplexity (and bits per character) of a model on a text."""
    with user_errors():
        from llamaforge.evaluate import perplexity as run

        run(model, text, output, tokenizer=tokenizer, max_length=max_length, stride=stride,
            device=device, dtype=dtype, echo=click.echo)


@main.command()
@click.option("--merged", required=True, type=click.Path(file_okay=False), help="The merged model folder.")
@click.option("--base", required=True, type=click.Path(file_okay=False), help="The base model folder it was merged from.")
@click.option("--lora", "loras", required=True, multiple=True, type=click.Path(file_okay=False),
              help="The adapters, in merge order (repeat).")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Tokenizer folder. Default: the merged folder.")
@click.option("--prompts", type=click.Path(dir_okay=False),
              help="Instruction file (text/JSON/JSONL). Default: the bundled llamaforge/data/eval_prompts.txt.")
@click.option("--tolerance", default=DEFAULT_TOLERANCE, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Allowed max |delta logit| for a float32 merge; float16/bfloat16 merges get 2x the measured rounding floor on top.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSON result (written also when the check fails).")
@DEVICE
def equivalence(merged, base, loras, tokenizer, prompts, tolerance, output, device):
    """Prove a merge: merged model vs base + adapters unmerged (exit 1 when it fails)."""
    with user_errors():
        from llamaforge.evaluate import equivalence as run

        run(merged, base, list(loras), output, tokenizer=tokenizer, prompts_file=prompts, tolerance=tolerance,
            device=device, echo=click.echo)


@main.command("tokenizer-stats")
@click.option("--tokenizer", required=True, type=click.Path(), help="Merged tokenizer folder (or tokenizer.model).")
@click.option("--base-tokenizer", required=True, type=click.Path(), help="Base tokenizer folder (or tokenizer.model).")
@click.option("--text", type=click.Path(dir_okay=False), help=TEXT_HELP)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSON result.")
def tokenizer_stats(tokenizer, base_tokenizer, text, output):
    """Characters per token before and after the vocabulary merge."""
    with user_errors():
        from llamaforge.evaluate import tokenizer_stats as run

        run(tokenizer, base_tokenizer, text, output, echo=click.echo)


@main.command()
@click.option("--model", "name", required=True, help="Model name (config.yaml).")
@click.option("--predictions", type=click.Path(dir_okay=False))
@click.option("--perplexity", "perplexity_json", type=click.Path(dir_okay=False))
@click.option("--equivalence", "equivalence_json", type=click.Path(dir_okay=False))
@click.option("--tokenizer-stats", "tokenizer_stats_json", type=click.Path(dir_okay=False))
@click.option("--multiple-choice", "multiple_choice", multiple=True, type=click.Path(dir_okay=False),
              help="A multiple-choice result, the merged model's or a GGUF export's (repeat).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSON summary.")
def summary(name, predictions, perplexity_json, equivalence_json, tokenizer_stats_json, multiple_choice, output):
    """The headline numbers of one model's evaluation outputs."""
    with user_errors():
        from llamaforge.evaluate import summarize

        summarize(name, output, predictions, perplexity_json, equivalence_json, tokenizer_stats_json, echo=click.echo,
                  multiple_choice=list(multiple_choice))


@main.command()
@click.option("--summary", "summaries", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A model's summary.json (repeat).")
@click.option("--tokens-per-char", type=click.Path(dir_okay=False), help="PNG: tokens per character, base vs merged.")
@click.option("--perplexity", "perplexity_png", type=click.Path(dir_okay=False), help="PNG: perplexity and bits per character.")
@click.option("--equivalence", "equivalence_png", type=click.Path(dir_okay=False), help="PNG: max |delta logit| per model.")
def plot(summaries, tokens_per_char, perplexity_png, equivalence_png):
    """Plots over all models' summaries."""
    with user_errors():
        from llamaforge.evaluate import plot as run

        for path in run(list(summaries), tokens_per_char, perplexity_png, equivalence_png):
            click.echo(f"wrote {path}")


@main.command("gguf-quality")
@click.option("--model", required=True, type=click.Path(file_okay=False), help="The Hugging Face model the GGUFs are of.")
@click.option("--gguf", "ggufs", required=True, multiple=True, type=click.Path(dir_okay=False), help="A GGUF export (repeatable).")
@click.option("--text", type=click.Path(dir_okay=False), help=TEXT_HELP)
@click.option("--prompts", type=click.Path(dir_okay=False), help="Fixed prompts (default: the bundled ones).")
@click.option("--max-length", type=click.IntRange(min=2), help="Perplexity window in tokens. Default: the model's context.")
@click.option("--stride", default=D.PERPLEXITY_STRIDE, show_default=True, type=click.IntRange(min=1), help="Window step.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="llama.cpp threads (0: all).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="JSON result (eval/{model}/gguf.json).")
@click.option("--f16", type=click.Path(dir_okay=False), default=None,
              help="The model's F16 GGUF: each export's mean KL from it over the text (kl_f16).")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="The importance matrix some exports were made with: the text must not be its calibration text.")
def gguf_quality(model, ggufs, text, prompts, max_length, stride, threads, output, f16, imatrix):
    """What each GGUF export costs in quality, measured with llama.cpp: bits per weight, size,
    perplexity, and top-1 agreement and KL divergence against the Hugging Face model."""
    with user_errors():
        from llamaforge.evaluate import gguf_quality as run

        run(model, list(ggufs), output, text, prompts, max_length, stride, threads, echo=click.echo, f16=f16,
            imatrix=imatrix)


@main.command("multiple-choice")
@click.option("--model", type=click.Path(file_okay=False), help="Hugging Face model folder (scored in float32 on the CPU).")
@click.option("--gguf", type=click.Path(dir_okay=False), help="A GGUF file (scored by llama.cpp), instead of --model.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="C-Eval CSV, CMMLU CSV or JSONL ({question, choices, answer}).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Summary JSON.")
@click.option("--items", required=True, type=click.Path(dir_okay=False), help="One JSON line per question (what was scored).")
@click.option("--shots", default=0, show_default=True, type=click.IntRange(min=0), help="Examples from the first rows of --dev.")
@click.option("--dev", type=click.Path(dir_okay=False), help="Dev file the shots come from (the data's format).")
@click.option("--template", type=click.Choice(["none", "auto"]), default="none", show_default=True,
              help="auto: the prompt goes through the tokenizer's chat template when it has one (Chinese-LLaMA-Alpaca's with_prompt).")
def multiple_choice(model, gguf, data, output, items, shots, dev, template):
    """Multiple-choice accuracy (C-Eval, CMMLU, MMLU-like): lm-evaluation-harness loglikelihood
    (acc, acc_norm) and Chinese-LLaMA-Alpaca's first-token scoring, on the same prompts."""
    with user_errors():
        from llamaforge.evaluate.mc import multiple_choice as run

        run(output, items, data, model=model, gguf=gguf, shots=shots, dev=dev, template=template, echo=click.echo)


@main.command("gguf-plot")
@click.option("--quality", "qualities", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="eval/{model}/gguf.json (repeatable).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="PNG file.")
def gguf_plot(qualities, output):
    """Perplexity and KL divergence against bits per weight, one point per GGUF export, per model."""
    with user_errors():
        from llamaforge.evaluate import plot_gguf_quality

        plot_gguf_quality(list(qualities), output)


@main.command("mc-plot")
@click.option("--summary", "summaries", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="eval/{model}/summary.json (repeatable).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="PNG file.")
def mc_plot(summaries, output):
    """Multiple-choice accuracy of each GGUF export against bits per weight (merged model dotted)."""
    with user_errors():
        from llamaforge.evaluate.mc.table import plot_multiple_choice

        plot_multiple_choice(list(summaries), output)


if __name__ == "__main__":
    main()
