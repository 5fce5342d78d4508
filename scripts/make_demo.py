#!/usr/bin/env python
"""Generate the embedded demo inputs (tiny LLaMA base, SentencePiece models, PEFT LoRAs)."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder to write (resources/demo).")
@click.option("--seed", default=D.DEMO_SEED, show_default=True, help="Seed; the same seed gives byte-identical files.")
def main(output, seed):
    setup_logging()
    with user_errors():
        from llamaforge.demo import make_demo

        make_demo(output, seed=seed, echo=click.echo)


if __name__ == "__main__":
    main()
