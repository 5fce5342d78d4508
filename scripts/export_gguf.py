#!/usr/bin/env python
"""Export a Hugging Face LLaMA folder (e.g. merged/NAME) to one GGUF file for llama.cpp."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="Output .gguf file (written atomically, with FILE.sha256 beside it).")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Weight type; norms stay F32.")
@click.option("--name", default=None, help="general.name in the metadata (default: the model folder's name).")
def main(model, output, outtype, name):
    setup_logging()
    with user_errors():
        from llamaforge.export import export_gguf

        export_gguf(model, output, outtype=outtype, name=name, echo=click.echo)


if __name__ == "__main__":
    main()
