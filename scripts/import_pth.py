#!/usr/bin/env python
"""Convert Meta's original LLaMA weights (consolidated.NN.pth + params.json) into a Hugging Face folder."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--input", "--model", "input_", required=True, type=click.Path(file_okay=False),
              help="Meta folder: consolidated.NN.pth, params.json (tokenizer.model in it or one level up).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Hugging Face folder (written atomically).")
@click.option("--tokenizer", type=click.Path(), default=None, help="tokenizer.model, if not in or beside the folder.")
@click.option("--max-shard-size", default=D.MAX_SHARD_SIZE, show_default=True, help="Largest safetensors shard, e.g. 5GB, 500MB.")
@click.option("--max-position-embeddings", type=click.IntRange(min=1), default=None,
              help="Context length for config.json (params.json has none): default 2048 for LLaMA-1 "
                   "(norm_eps 1e-6), 4096 for LLaMA-2 (norm_eps 1e-5), or params.json's max_seq_len.")
def main(input_, output, tokenizer, max_shard_size, max_position_embeddings):
    setup_logging()
    with user_errors():
        from llamaforge.export.meta_import import import_pth

        import_pth(input_, output, tokenizer=tokenizer, max_shard_size=max_shard_size,
                   max_positions=max_position_embeddings, echo=click.echo)


if __name__ == "__main__":
    main()
