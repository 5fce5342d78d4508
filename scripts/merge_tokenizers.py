#!/usr/bin/env python
"""Merge an extra SentencePiece model into a LLaMA base model (Chinese-LLaMA recipe), or add tokens
to a tokenizer.json tokenizer (Llama-3, Qwen2: --base FOLDER --add-token ...).

Writes DIR/ with the merged tokenizer.model and the Hugging Face tokenizer files.
"""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", "base", required=True, type=click.Path(),
              help="Base tokenizer.model (LLaMA), or a tokenizer.json tokenizer folder.")
@click.option("--extra", "extra", type=click.Path(dir_okay=False),
              help="SentencePiece model whose new pieces are appended (SentencePiece bases only).")
@click.option("--add-token", "add_tokens", multiple=True, help='Token appended after the merge, e.g. "[PAD]" (repeatable).')
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
def main(base, extra, add_tokens, output):
    setup_logging()
    with user_errors():
        from llamaforge.tokenizer import merge_tokenizers

        merge_tokenizers(base, extra, output, add_tokens=list(add_tokens), echo=click.echo)


if __name__ == "__main__":
    main()
