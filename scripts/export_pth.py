#!/usr/bin/env python
"""Export a Hugging Face LLaMA folder (e.g. merged/NAME) to Meta's consolidated.NN.pth + params.json."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Output folder: consolidated.NN.pth, params.json, tokenizer.model, SHA256SUMS (written atomically).")
@click.option("--num-shards", type=click.IntRange(min=1), default=None,
              help="consolidated.NN.pth files; default Meta's count for the hidden size (4096: 1, 5120: 2, 6656: 4, "
                   "8192: 8, otherwise 1).")
def main(model, output, num_shards):
    setup_logging()
    with user_errors():
        from llamaforge.export.pth import export_pth

        export_pth(model, output, num_shards=num_shards, echo=click.echo)


if __name__ == "__main__":
    main()
