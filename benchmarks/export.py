#!/usr/bin/env python
"""Benchmark: llamaforge's streaming exports (Meta .pth, GGUF) against `cp -r` of the same bytes.

Synthesizes a merged-like float16 LLaMA at a realistic shape with benchmarks/merge.py's synthesizer
(default: hidden 2048, intermediate 5504, 22 layers, vocabulary 49953, ~2.5 GB in two safetensors
shards, a 49953-piece tokenizer.model), then runs, each in its own process and in turn:

  pth N=1     scripts/export_pth.py                    consolidated.00.pth + params.json
  pth N=2     scripts/export_pth.py --num-shards 2     two shards, the odd vocabulary split unevenly
  gguf f16    scripts/export_gguf.py --outtype f16
  gguf q8_0   scripts/export_gguf.py --outtype q8_0
  cp          cp -r of the model folder (the floor: copying the same bytes)

Every route's time includes a `sync`, so each output has reached the disk. Prints the median wall
time and peak RSS (the child's own ru_maxrss, via merge.py's run()) of --repeat runs with a warm page
cache, and the ratios to cp. Targets: peak RSS <= 1 GiB for every export; wall <= 2x cp for pth and
GGUF F16. Not a test: run it by hand.

    python benchmarks/export.py                 # default shape, median of 3
    python benchmarks/export.py --repeat 1 --skip q8_0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llamaforge_bench_merge", ROOT / "benchmarks" / "merge.py")
bench_merge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_merge)  # stdlib only at import time: this driver stays small

GIB = 2**30
TARGET_RSS = 1.0  # GiB
TARGET_WALL = {"pth N=1": 1.5, "pth N=2": 1.5, "gguf f16": 1.5, "gguf q8_0": 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(bench_merge.SHAPES), default="default")
    ap.add_argument("--vocab", type=int, default=49953)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", action="append", default=[], choices=["pth1", "pth2", "f16", "q8_0"],
                    help="leave a route out (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamaforge-bench-export")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout (e.g. a git worktree of the previous commit): its exports run beside these")
    ap.add_argument("--no-sync", action="store_true",
                    help="time without the final sync: the page cache absorbs the writes (the CPU-bound regime)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    # merge.py's synthesizer in a child process (a child forked from a big parent reports the parent's
    # RSS as its own peak). Its base, with the vocabulary already at --vocab, is our merged model.
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--synthesize-only", "--shape", args.shape,
                    "--vocab", str(args.vocab), "--new-vocab", str(args.vocab), "--workdir", str(args.workdir)],
                   check=True)
    model = args.workdir / args.shape / "base"
    size = bench_merge.du(model)
    print(f"model: {model} ({size / 1e9:.2f} GB, vocabulary {args.vocab}) "
          f"[{time.perf_counter() - t0:.0f} s to synthesize or reuse]", flush=True)

    out = args.workdir / "out"
    py = sys.executable
    routes = {
        "pth N=1": [py, str(ROOT / "scripts" / "export_pth.py"), "--model", str(model), "--output", str(out),
                    "--num-shards", "1"],
        "pth N=2": [py, str(ROOT / "scripts" / "export_pth.py"), "--model", str(model), "--output", str(out),
                    "--num-shards", "2"],
        "gguf f16": [py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model), "--output",
                     str(out / "m-f16.gguf"), "--outtype", "f16"],
        "gguf q8_0": [py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model), "--output",
                      str(out / "m-q8_0.gguf"), "--outtype", "q8_0"],
        "cp": ["cp", "-r", str(model), str(out)],
    }
    skip = {"pth1": "pth N=1", "pth2": "pth N=2", "f16": "gguf f16", "q8_0": "gguf q8_0"}
    for s in args.skip:
        routes.pop(skip[s])
    if args.before:  # the same commands with the other checkout's scripts, each beside its own
        old = str(args.before.resolve() / "scripts")
        routes = {k2: v2 for k, v in routes.items() for k2, v2 in (
            [(k, v)] + ([(f"{k} before", [c.replace(str(ROOT / "scripts"), old) for c in v])] if k != "cp" else []))}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in routes}
    subprocess.run(["cat"] + [str(f) for f in model.iterdir()], stdout=subprocess.DEVNULL, check=True)  # warm cache
    for i in range(args.repeat):
        # every other round in reverse order: no route always follows the same one
        for name, cmd in (list(routes.items()) if i % 2 == 0 else list(routes.items())[::-1]):
            shutil.rmtree(out, ignore_errors=True)
            if name.startswith("gguf"):
                out.mkdir(parents=True)
            subprocess.run(["sync"], check=True)
            wall, rss = bench_merge.run(cmd, sync=not args.no_sync)
            rss_gib = rss * 1e6 / 2**20  # run() gives ru_maxrss (KiB) / 1e6
            results[name].append((wall, rss_gib))
            print(f"  run {i + 1} {name:<10} {wall:7.1f} s  {rss_gib:6.2f} GiB peak RSS   "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    cp = med["cp"][0]
    print(f"\nhost: {os.cpu_count()} CPUs; the load average beside each run shows other work on the machine")
    print(f"shape {args.shape}: {bench_merge.SHAPES[args.shape]}, vocab {args.vocab}, float16, {size / 1e9:.2f} GB, "
          f"median of {args.repeat}, " + ("no sync (page cache absorbs the writes)" if args.no_sync else "with sync"))
    print(f"{'route':<17}{'wall s':>9}{'x cp':>8}{'peak RSS GiB':>14}   target")
    verdicts = {}
    for k, (w, r) in med.items():
        target = ""
        if k != "cp":
            ok_rss = r <= TARGET_RSS
            goal = TARGET_WALL.get(k.removesuffix(" before"))
            ok_wall = goal is None or w / cp <= goal
            verdicts[k] = ok_rss and ok_wall
            target = f"RSS <= {TARGET_RSS:g} GiB" + (f", wall <= {goal:g}x cp" if goal else "")
            target += "  ok" if verdicts[k] else "  MISSED"
        print(f"{k:<17}{w:>9.1f}{w / cp:>8.2f}{r:>14.2f}   {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shape": args.shape, "vocab": args.vocab, "bytes": size, "runs": results,
                                         "median": med, "targets_met": verdicts}, indent=2))


if __name__ == "__main__":
    main()
