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


class _OneLineUsage:
    """Click's own errors (a missing option, a bad value, a file where a folder is expected) as one
    `llamaforge: error: OPTION: what. Fix: how` line and exit status 1, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"llamaforge: error: {usage_line(e)}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("llamaforge: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def usage_line(e: click.ClickException) -> str:
    """One line for a Click error: the option at fault, what is wrong, and where to look."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "the command"
    param = getattr(e, "param", None)
    if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter) and param is not None:
        hint = "/".join(getattr(param, "opts", []) or [param.name or "argument"])
        text = f"{hint}: {e.message}"
    else:
        text = e.format_message()
    text = " ".join(text.split()).rstrip(".")
    return f"{text}. Fix: see `{command} --help`."


class Command(_OneLineUsage, click.Command):
    """click.Command with one-line usage errors (use as `@click.command(cls=Command)`)."""


class Group(_OneLineUsage, click.Group):
    """click.Group with one-line usage errors (use as `@click.group(cls=Group)`)."""
