#!/usr/bin/env python
"""Export a Hugging Face model folder (e.g. merged/NAME) to one GGUF file for llama.cpp, with its
.sha256 and an Ollama Modelfile beside it. f16/bf16/q8_0 are written by llamaforge; q4_0 ... q6_k
by llama.cpp's own quantizer from llamaforge's F16 (needs the gguf extra: llama-cpp-python)."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors
from llamaforge.export.gguf_meta import GGUF_TYPES
from llamaforge.export.quantize import LLAMA_CPP_TYPES
from llamaforge.export.modelfile import MODELFILE_PARAMETERS, parse_parameters


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="Output .gguf file (written atomically, with FILE.sha256 and STEM.Modelfile beside it).")
@click.option("--outtype", type=click.Choice(list(GGUF_TYPES + LLAMA_CPP_TYPES)), default="f16", show_default=True,
              help="Weight type; norms stay F32. q4_0 ... q6_k, iq*: llama.cpp's quantizer (llama-quantize's types).")
@click.option("--name", default=None, help="general.name in the metadata (default: the model folder's name).")
@click.option("--modelfile/--no-modelfile", default=True, show_default=True,
              help="Write STEM.Modelfile for Ollama (FROM, TEMPLATE of the prompt format, stop strings).")
@click.option("--parameter", "parameters", multiple=True, callback=parse_parameters, metavar="KEY=VALUE",
              help=f"A Modelfile PARAMETER ({', '.join(MODELFILE_PARAMETERS)}); repeatable.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads of llama.cpp's quantizer (0: all cores).")
@click.option("--from-f16", type=click.Path(dir_okay=False), default=None,
              help="Quantize this F16 GGUF of the model (written by llamaforge) instead of writing one.")
@click.option("--imatrix", type=click.Path(dir_okay=False), default=None,
              help="Importance matrix (scripts/imatrix.py): llama.cpp's llama-quantize --imatrix makes the file "
                   "(build it once: scripts/build_tools.py). Needed by iq1_*, iq2_*, iq3_xxs, iq3_xs, q2_k_s.")
def main(model, output, outtype, name, modelfile, parameters, threads, from_f16, imatrix):
    setup_logging()
    with user_errors():
        from llamaforge.export.gguf import export_gguf

        export_gguf(model, output, outtype=outtype, name=name, echo=click.echo,
                    modelfile=parameters if modelfile else None, threads=threads, from_f16=from_f16, imatrix=imatrix)


if __name__ == "__main__":
    main()
