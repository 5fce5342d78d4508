#!/usr/bin/env python
"""Build llama.cpp's own llama-imatrix and llama-quantize once, from the llama.cpp that the installed
llama-cpp-python vendors (its sdist, fetched by pip), into ~/.cache/llamaforge/llama.cpp-tools/VERSION
($LLAMAFORGE_TOOLS_DIR overrides). Nothing to do when they are built. Needs CMake and a C++ compiler."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--source", type=click.Path(exists=False), default=None,
              help="llama-cpp-python's sdist (.tar.gz) or its unpacked folder. Default: pip downloads it.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True, help="Parallel compile jobs.")
@click.option("--print-path", is_flag=True, help="Only print the build folder (whether built or not).")
def main(source, jobs, print_path):
    setup_logging()
    with user_errors():
        from llamaforge.export.tools import build_dir, build_tools

        if print_path:
            click.echo(build_dir())
            return
        build_tools(source, jobs=jobs, echo=click.echo)


if __name__ == "__main__":
    main()
