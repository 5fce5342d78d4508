"""Helpers shared by the Click commands in scripts/.

Scripts stay thin: they parse options and call one library function inside `user_errors()`,
which turns a LlamaforgeError into one line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
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


_USER_ERRNOS = {
    errno.ENOSPC: "free space on that disk, or write the output to another one",
    errno.EDQUOT: "free space within your quota, or write the output elsewhere",
    errno.EACCES: "check the file's permissions, or choose another path",
    errno.EPERM: "check the file's permissions, or choose another path",
    errno.EROFS: "write the output to a writable file system",
    errno.ENAMETOOLONG: "use a shorter path",
}


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except LlamaforgeError as e:
        click.echo(f"llamaforge: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        # what the disk or the system says about a path (full disk, permissions): the user's to fix
        if e.errno not in _USER_ERRNOS:
            raise
        where = f"{os.fspath(e.filename)}: " if e.filename else ""
        fix = _USER_ERRNOS[e.errno]
        click.echo(f"llamaforge: error: {where}{e.strerror or e}. Fix: {fix}.", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("llamaforge: interrupted", err=True)
        sys.exit(130)
