"""Crawl throughput at concurrency 8 against concurrency 1, on a server with 200 ms latency.

Starts the scripted OpenAI-compatible server of the tests (tests/crawl_server.py) in its own
process, then times `llamaforge.crawl.crawl` for the same number of requests at each
concurrency, each run in a fresh folder, through the real openai client. Latency dominates a
real crawl, so the ratio shows how much of the ideal 8x the client-side work (parsing, dedup,
fsynced appends) leaves. Exits 1 if concurrency 8 is under 6x the throughput of concurrency 1.

    python benchmarks/crawl.py [--requests 32] [--latency 0.2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
runpy.run_path(str(REPO / "scripts" / "_pathfix.py"))  # this checkout's src/ first, as the scripts do

from llamaforge.crawl import crawl  # noqa: E402
KEY = "sk-benchmark"
TARGET = 6.0


def timed_crawl(url: str, requests: int, concurrency: int, items: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="crawl-bench-") as tmp:
        started = time.perf_counter()
        stats = crawl(Path(tmp) / "bench.jsonl", requests, concurrency=concurrency, base_url=url, api_key=KEY,
                      items_per_request=items, timeout=60.0, progress=False)
        seconds = time.perf_counter() - started
    if stats["requests"]["remaining"]:
        raise SystemExit(f"benchmark run left {stats['requests']['remaining']} requests unanswered")
    return seconds, stats["items"]["accepted"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--latency", type=float, default=0.2, help="server latency in seconds (default 0.2)")
    parser.add_argument("--items", type=int, default=20, help="items per request (default 20)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per concurrency; the median is reported")
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "crawl_server.py"), "--latency", str(args.latency), "--api-key", KEY],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = server.stdout.readline().strip()
        print(f"server {url}, latency {args.latency * 1000:.0f} ms, {args.requests} requests of "
              f"{args.items} items per run, median of {args.repeats}")
        throughput = {}
        for concurrency in (1, 8):
            runs = [timed_crawl(url, args.requests, concurrency, args.items) for _ in range(args.repeats)]
            seconds = statistics.median(s for s, _ in runs)
            items = runs[0][1]
            ideal = args.requests * args.latency / concurrency
            throughput[concurrency] = args.requests / seconds
            print(f"concurrency {concurrency}: {seconds:6.2f} s  {args.requests / seconds:6.2f} requests/s  "
                  f"{items / seconds:7.1f} items/s  (latency-bound ideal {ideal:.2f} s)")
    finally:
        server.terminate()
        server.wait(timeout=10)
    ratio = throughput[8] / throughput[1]
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(f"concurrency 8 / concurrency 1 throughput: {ratio:.2f}x (target >= {TARGET:.0f}x): {verdict}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
