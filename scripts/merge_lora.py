#!/usr/bin/env python
"""Merge LoRA adapters, in order, into base weights, streaming tensor by tensor."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", required=True, type=click.Path(file_okay=False), help="Base model folder (Hugging Face).")
@click.option("--lora", "loras", multiple=True, type=click.Path(file_okay=False),
              help="PEFT adapter folder; repeat in merge order (e.g. LLaMA-Plus, then Alpaca-Plus).")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
              help="Tokenizer folder for the result (default: the last adapter's folder, else the base).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=D.MERGE_DTYPE, show_default=True)
@click.option("--max-shard-size", default=D.MAX_SHARD_SIZE, show_default=True, help="Largest safetensors shard, e.g. 5GB, 500MB.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=D.MERGE_DEVICE, show_default=True,
              help="Where the LoRA arithmetic runs.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def main(base, loras, tokenizer, output, dtype, max_shard_size, device, no_progress):
    setup_logging()
    with user_errors():
        from llamaforge.merge.run import merge_lora

        merge_lora(base, list(loras), output, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                   device=device, echo=click.echo, progress=not no_progress)


if __name__ == "__main__":
    main()
