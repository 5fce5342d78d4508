"""Helpers shared by the Click commands in scripts/.

Scripts stay thin: they parse options and call one library function inside `user_errors()`,
which turns a LlamaforgeError into one line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

import click

from .errors import LlamaforgeError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except LlamaforgeError as e:
        click.echo(f"llamaforge: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("llamaforge: interrupted", err=True)
        sys.exit(130)
