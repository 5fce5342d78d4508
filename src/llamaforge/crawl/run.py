"""The crawl's driver: crawl() checks its settings and the key, guards its output files, runs the
requests concurrently on one event loop (SIGTERM ends it like Ctrl-C), and writes the Alpaca JSON
and the stats at the end of every run, finished or not."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import write_json
from ..files.guard import json_or_none, guard_output, register_output_kind
from .client import _complete, _display_url, _redact, _reply_fields, _Settings
from .store import _alpaca_is_ours, _Store, alpaca_of, output_paths

log = logging.getLogger(__package__)  # "llamaforge.crawl", as one logger for the whole crawl

CRAWL_STATS = "crawl"  # the "llamaforge" value of the crawl's stats file
# the stats file is the crawl's by that value, or by its totals (an earlier llamaforge wrote no "llamaforge")
register_output_kind("crawl_stats", "crawl stats file", lambda p: isinstance(d := json_or_none(p), dict) and (
    d.get("llamaforge") == CRAWL_STATS or {"requests", "items", "tokens", "cost_usd"} <= d.keys()))

DEFAULT_MODEL = "gpt-4o-mini"


async def _run(store: _Store, todo: list[int], s: _Settings, client_args: dict, concurrency: int, progress) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    # SIGTERM (Snakemake or SLURM stopping the job) ends the run like Ctrl-C does: in-flight
    # requests are cancelled at an await, never half-way through writing a reply.
    try:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        handles_sigterm = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
        handles_sigterm = False

    pending = iter(todo)  # shared by the workers: each index is taken by exactly one

    async def worker(client) -> None:
        for index in pending:
            completion, attempts = await _complete(client, s, index)
            if completion is None:
                store.totals.failed += 1
                store.totals.retried += attempts - 1
            else:
                content, usage, finish_reason = _reply_fields(completion)
                # a server that echoes the key must not get it written into the raw file
                store.add_reply(index, _redact(content, s.api_key), usage, attempts, _redact(finish_reason, s.api_key))
            progress.update(1)
            progress.set_postfix(items=store.totals.accepted, failed=store.totals.failed, refresh=False)

    try:
        async with openai.AsyncOpenAI(max_retries=0, **client_args) as client:
            workers = [asyncio.ensure_future(worker(client)) for _ in range(min(concurrency, len(todo)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        if handles_sigterm:
            loop.remove_signal_handler(signal.SIGTERM)


MAX_REQUESTS = 1_000_000  # 5 items each: 100 times the 52k of Stanford Alpaca


def check_api_key(key: str) -> None:
    """An HTTP header takes printable ASCII: a key with a line end (read from a CRLF file), a space or
    another character is one error here, without the key, instead of retried "connection errors"."""
    bad = next((c for c in key if not ("!" <= c <= "~")), None)
    if bad is not None:
        where = "at its end" if key.index(bad) == len(key) - 1 else "in it"
        raise LlamaforgeError(f"OPENAI_API_KEY holds the character {ascii(bad)} {where}, which no HTTP header can "
                              "carry", fix="set the key without line ends or spaces (e.g. export OPENAI_API_KEY="
                              "\"$(tr -d '\\r\\n ' < key.txt)\")")


def _check_settings(num_requests, concurrency, items_per_request, max_retries, timeout, backoff, dedup_threshold,
                    price_in, price_out) -> None:
    # written so that NaN fails every check (every comparison with NaN is false)
    problems = [
        (not 0 <= num_requests <= MAX_REQUESTS, f"--num-requests must be 0 to {MAX_REQUESTS:,}"),
        (not concurrency >= 1, "--concurrency must be at least 1"),
        (not items_per_request >= 1, "--items-per-request must be at least 1"),
        (not max_retries >= 0, "--max-retries must be 0 or more"),
        (not 0 < timeout < float("inf"), "--timeout must be a positive number of seconds"),
        (not 0 <= backoff < float("inf"), "--backoff must be 0 or more seconds"),
        (not 0 < dedup_threshold <= 1, "--dedup-threshold must be in (0, 1]"),
        (not (0 <= price_in < float("inf") and 0 <= price_out < float("inf")), "prices must be 0 or more"),
    ]
    for bad, message in problems:
        if bad:
            raise LlamaforgeError(message, fix="change the option or the crawl entry in config.yaml")


def crawl(
    output: str | os.PathLike,
    num_requests: int,
    *,
    concurrency: int = D.CRAWL_CONCURRENCY,
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    items_per_request: int = D.CRAWL_ITEMS_PER_REQUEST,
    seed: int = D.CRAWL_SEED,
    max_retries: int = D.CRAWL_MAX_RETRIES,
    timeout: float = D.CRAWL_TIMEOUT,
    backoff: float = D.CRAWL_BACKOFF,
    dedup_threshold: float = D.CRAWL_DEDUP_THRESHOLD,
    alpaca_json: str | os.PathLike | None = None,
    price_in: float = D.CRAWL_PRICE,
    price_out: float = D.CRAWL_PRICE,
    api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Crawl until requests 0..num_requests-1 all have a reply in the raw file; return the stats.

    The key is `api_key` or $OPENAI_API_KEY; the server is `base_url` or $OPENAI_BASE_URL or
    OpenAI's. Prices are USD per million prompt/completion tokens. The Alpaca JSON and stats
    are written at the end of every run, finished or not; a run with failed requests raises
    LlamaforgeError afterwards, and running it again retries them.
    """
    _check_settings(num_requests, concurrency, items_per_request, max_retries, timeout, backoff, dedup_threshold,
                    price_in, price_out)
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise LlamaforgeError(
            "OPENAI_API_KEY is not set",
            fix="export OPENAI_API_KEY=<your key> (any non-empty value for a local server that checks none)",
        )
    check_api_key(api_key)
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    items_path, raw_path, default_json, stats_path = output_paths(output)
    alpaca_path = Path(alpaca_json) if alpaca_json else default_json
    outputs = ((items_path, "crawl_items"), (raw_path, "crawl_raw"), (alpaca_path, "alpaca"), (stats_path, "crawl_stats"))
    resolved = [p.resolve() for p, _ in outputs]
    if len(set(resolved)) < len(resolved):
        raise LlamaforgeError("--alpaca-json is one of the crawl's own files (the .jsonl, .raw.jsonl or .stats.json)",
                              alpaca_path, "give the Alpaca JSON a name of its own, e.g. NAME.json beside NAME.jsonl")
    for path, kind in outputs:
        guard_output(path, kind, own=(lambda p: _alpaca_is_ours(p, items_path)) if kind == "alpaca" else None)

    store = _Store(items_path, raw_path, seed, items_per_request, dedup_threshold)
    settings = _Settings(model, seed, items_per_request, max_retries, backoff, api_key)
    todo = [i for i in range(num_requests) if i not in store.done]
    log.info("%s: %d of %d requests done, %d to go; model %s at %s, concurrency %d",
             items_path, num_requests - len(todo), num_requests, len(todo), model, _display_url(base_url),
             concurrency)
    started = time.monotonic()
    outcome = "interrupted"
    try:
        bar = tqdm(total=num_requests, initial=num_requests - len(todo), unit="req", desc="crawl",
                   file=sys.stderr, disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10)
        with bar, logging_redirect_tqdm():
            if todo:
                client_args = {"api_key": api_key, "base_url": base_url, "timeout": timeout}
                asyncio.run(_run(store, todo, settings, client_args, concurrency, bar))
        outcome = "finished"
    except LlamaforgeError:
        outcome = "aborted"
        raise
    except asyncio.CancelledError:  # SIGTERM, see _run
        raise KeyboardInterrupt from None
    finally:
        store.close()
        stats = _write_outputs(store, alpaca_path, stats_path, num_requests, model, price_in, price_out,
                               time.monotonic() - started)
        _log_summary(stats, outcome)
    missing = stats["requests"]["remaining"]
    if missing:
        raise LlamaforgeError(
            f"{missing} of {num_requests} requests have no reply ({stats['requests']['failed']} failed in this run; "
            "the log says why)", raw_path, "run the same command again: finished requests are kept and not repeated",
        )
    return stats


def _write_outputs(store: _Store, alpaca_path: Path, stats_path: Path, num_requests: int,
                   model: str, price_in: float, price_out: float, seconds: float) -> dict[str, Any]:
    items = alpaca_of(store.items)
    write_json(alpaca_path, items)
    t = store.totals
    finished = len(store.done & set(range(num_requests)))
    stats = {
        "llamaforge": CRAWL_STATS,
        "model": model,
        "requests": {
            "total": num_requests,
            "ok": t.ok,
            "failed": t.failed,
            "retried": t.retried,
            "remaining": num_requests - finished,
        },
        "items": {
            "parsed": t.parsed,
            "accepted": t.accepted,
            "rejected": sum(t.rejected.values()),
            "duplicate": t.rejected["duplicate"],
            "rejected_by_reason": t.rejected,
            "in_jsonl": len(items),
        },
        "tokens": {
            "prompt": t.prompt_tokens,
            "completion": t.completion_tokens,
            "total": t.prompt_tokens + t.completion_tokens,
        },
        "cost_usd": round((t.prompt_tokens * price_in + t.completion_tokens * price_out) / 1e6, 6),
        "price_per_million_tokens": {"input": price_in, "output": price_out},
        "last_run_seconds": round(seconds, 3),
    }
    write_json(stats_path, stats)
    return stats


def _log_summary(stats: dict[str, Any], outcome: str) -> None:
    r, i, t = stats["requests"], stats["items"], stats["tokens"]
    reasons = ", ".join(f"{k} {v}" for k, v in i["rejected_by_reason"].items() if v) or "none"
    log.info(
        "crawl %s: requests %d/%d ok, %d failed, %d retries; items %d accepted, %d rejected (%s); "
        "tokens %d in + %d out, cost $%.4f",
        outcome, r["total"] - r["remaining"], r["total"], r["failed"], r["retried"], i["accepted"], i["rejected"],
        reasons, t["prompt"], t["completion"], stats["cost_usd"],
    )
    if r["remaining"]:
        log.info("%d requests have no reply yet: run the same command again to resume", r["remaining"])
