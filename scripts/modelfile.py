#!/usr/bin/env python
"""Write an Ollama Modelfile for a GGUF: FROM ./FILE, the TEMPLATE of its prompt format (from the
GGUF's chat template), its stop strings and generation parameters (scripts/export_gguf.py writes
one itself; the workflow uses this, so a changed generation setting rewrites only the Modelfile)."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors
from llamaforge.export.modelfile import MODELFILE_PARAMETERS, parse_parameters


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--gguf", "gguf_path", required=True, type=click.Path(dir_okay=False), help="The GGUF file.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Default: STEM.Modelfile beside it.")
@click.option("--parameter", "parameters", multiple=True, callback=parse_parameters, metavar="KEY=VALUE",
              help=f"A Modelfile PARAMETER ({', '.join(MODELFILE_PARAMETERS)}); repeatable.")
def main(gguf_path, output, parameters):
    setup_logging()
    with user_errors():
        from llamaforge.export.modelfile import write_modelfile

        click.echo(f"wrote {write_modelfile(gguf_path, parameters, output)}")


if __name__ == "__main__":
    main()
