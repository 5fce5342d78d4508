#!/usr/bin/env python
"""Benchmark: batched multiple-choice scoring (the context run once, its KV cache repeated for the
choices, which run as one right-padded batch) against one continuation at a time (context +
continuation as one sequence per choice, lm-evaluation-harness's per-request computation).

Scores the bundled bilingual demo set (src/llamaforge/data/mc_demo.jsonl, 2 shots from
mc_demo_dev.jsonl) with SmolLM2-135M-Instruct (tests/families.py fetches it once) or --model FOLDER,
float32 on the CPU, one thread by default, through the Hugging Face backend of
`scripts/evaluate.py multiple-choice`. Prints the median seconds of each route over --repeat runs
(after a warm-up), the ratio, and the largest |delta loglik| between them; exits 1 when the answers
differ or a loglik differs by more than 1e-3 nats. Not a test: run it by hand.

    python benchmarks/multiple_choice.py
    python benchmarks/multiple_choice.py --model merged/demo --shots 0
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
runpy.run_path(str(ROOT / "scripts" / "_pathfix.py"))  # this checkout's src/ first, as the scripts do


def requests(lm, shots: int):
    """(context ids, [continuation ids]) per question of the demo set, as multiple-choice builds them."""
    from llamaforge.evaluate.mc import encode_pair, load_questions
    from llamaforge.evaluate.mc.prompts import build_prompt, continuations

    data = ROOT / "src" / "llamaforge" / "data"
    fmt, qs = load_questions(data / "mc_demo.jsonl")
    dev = load_questions(data / "mc_demo_dev.jsonl")[1][:shots]
    out = []
    for q in qs:
        ctx = build_prompt(q, dev, fmt, options=False)
        pairs = [encode_pair(lm.encode, lm.add_bos, lm.bos_id, ctx, c) for c in continuations(q, fmt)]
        out.append((pairs[0][0], [c for _, c in pairs]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from families import smollm2

        model = smollm2()
    from llamaforge.evaluate.mc.backends import HFBackend

    lm = HFBackend(model, echo=lambda *_: None)
    reqs = requests(lm, args.shots)

    def batched():
        return [lm.score(ctx, conts) for ctx, conts in reqs]

    def one_by_one():
        return [[lm.score_one(ctx, c) for c in conts] for ctx, conts in reqs]

    times = {}
    results = {}
    for name, fn in (("one continuation at a time", one_by_one), ("batched (shared context)", batched)):
        results[name] = fn()  # warm-up
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    a, b = results.values()
    delta = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    same = all(max(range(len(ra)), key=ra.__getitem__) == max(range(len(rb)), key=rb.__getitem__) for ra, rb in zip(a, b))
    n = sum(len(c) for _, c in reqs)
    print(f"model {model}: {len(reqs)} questions, {n} continuations, {args.shots} shots, {args.threads or 'default'} thread(s)")
    for name, t in times.items():
        print(f"  {name:28s} {t:8.3f} s")
    slow, fast = times.values()
    print(f"ratio: {slow / fast:.2f}x faster batched; max |delta loglik| {delta:.2e} nats; same answers: {same}")
    return 0 if same and delta <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
