#!/usr/bin/env python
"""Generate Alpaca-format instruction data from an OpenAI-compatible chat API.

The key is read from OPENAI_API_KEY (never from the command line, so it stays out of shell
history, process lists and Snakemake logs). Running the same command again resumes: requests
that already have a reply are not sent again.
"""

from __future__ import annotations

import logging

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Command, setup_logging, user_errors
from llamaforge.crawl import DEFAULT_MODEL, crawl


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="Accepted items, one JSON object a line (F.jsonl); F.raw.jsonl and F.stats.json go beside it.")
@click.option("--num-requests", required=True, type=int, help="Total requests, counting those of earlier runs.")
@click.option("--concurrency", default=D.CRAWL_CONCURRENCY, show_default=True, type=int, help="Requests in flight at once.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--base-url", envvar="OPENAI_BASE_URL", show_envvar=True, default=None,
              help="Server URL, e.g. http://localhost:8000/v1 (default: OpenAI's).")
@click.option("--items-per-request", default=D.CRAWL_ITEMS_PER_REQUEST, show_default=True, type=int)
@click.option("--seed", default=D.CRAWL_SEED, show_default=True, type=int, help="Decides every prompt; keep it when resuming.")
@click.option("--max-retries", default=D.CRAWL_MAX_RETRIES, show_default=True, type=int,
              help="Retries per request on 429, 5xx, timeouts and connection errors.")
@click.option("--timeout", default=D.CRAWL_TIMEOUT, show_default=True, type=float, help="Seconds per request attempt (a 20-item reply can take minutes).")
@click.option("--backoff", default=D.CRAWL_BACKOFF, show_default=True, type=float,
              help="First retry delay in seconds, doubled per retry (a server's Retry-After wins).")
@click.option("--dedup-threshold", default=D.CRAWL_DEDUP_THRESHOLD, show_default=True, type=float,
              help="Reject an item whose instruction has a character ROUGE-L above this with any kept one.")
@click.option("--alpaca-json", type=click.Path(dir_okay=False), default=None,
              help="Alpaca JSON list of all items [default: F.json].")
@click.option("--price-in", default=D.CRAWL_PRICE, show_default=True, type=float, help="USD per 1M prompt tokens.")
@click.option("--price-out", default=D.CRAWL_PRICE, show_default=True, type=float, help="USD per 1M completion tokens.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def main(output, num_requests, concurrency, model, base_url, items_per_request, seed, max_retries, timeout, backoff,
         dedup_threshold, alpaca_json, price_in, price_out, progress):
    setup_logging()
    # The HTTP libraries log every request at INFO; keep the log to the crawl's own lines.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with user_errors():
        crawl(output, num_requests, concurrency=concurrency, model=model, base_url=base_url,
              items_per_request=items_per_request, seed=seed, max_retries=max_retries, timeout=timeout,
              backoff=backoff, dedup_threshold=dedup_threshold, alpaca_json=alpaca_json, price_in=price_in,
              price_out=price_out, progress=progress)


if __name__ == "__main__":
    main()
