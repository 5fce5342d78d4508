#!/usr/bin/env python
"""Compute a model's importance matrix with llama.cpp's own llama-imatrix (built once by
scripts/build_tools.py) on its F16 GGUF and a calibration text, in llama.cpp's GGUF imatrix format;
FILE.imatrix.gguf.json beside it records the text's sha256. Quantized exports then take it:
scripts/export_gguf.py --imatrix FILE.imatrix.gguf."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder (merged/NAME).")
@click.option("--text", required=True, type=click.Path(dir_okay=False), help="Calibration text (UTF-8).")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="FILE.imatrix.gguf (written atomically, with FILE.imatrix.gguf.json beside it).")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Chunks of the text to use. Default: all.")
@click.option("--ctx", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per chunk.")
@click.option("--from-f16", type=click.Path(dir_okay=False), default=None,
              help="The model's F16 GGUF (written by llamaforge). Default: one is written first (temporary).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="Threads (0: llama.cpp's default).")
def main(model, text, output, chunks, ctx, from_f16, threads):
    setup_logging()
    with user_errors():
        from llamaforge.export.imatrix import make_imatrix

        make_imatrix(model, text, output, chunks=chunks, from_f16=from_f16, ctx=ctx, threads=threads, echo=click.echo)


if __name__ == "__main__":
    main()
