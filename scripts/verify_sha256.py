#!/usr/bin/env python
"""Check files against expected sha256 hashes (config.yaml's sha256:) and SHA256SUMS files; write a report."""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge.cli import Command, setup_logging, user_errors


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--expect", "expects", multiple=True, metavar="PATH=SHA256",
              help="A file (relative to the current folder) and its expected sha256; repeat.")
@click.option("--sums", "sums", multiple=True, type=click.Path(dir_okay=False),
              help="A SHA256SUMS or FILE.sha256 file (sha256sum -c format) to check too; repeat.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Report file, written only when all match.")
def main(expects, sums, output):
    setup_logging()
    with user_errors():
        from llamaforge.errors import LlamaforgeError
        from llamaforge.files.checksums import verify_to_report

        expected = {}
        for e in expects:
            path, sep, digest = e.rpartition("=")
            if not sep or not path:
                raise LlamaforgeError(f"--expect {e!r} is not PATH=SHA256", None, "write it like exports/x/a.pth=0123...ef")
            expected[path] = digest
        verify_to_report(expected, sums, output, echo=click.echo)


if __name__ == "__main__":
    main()
