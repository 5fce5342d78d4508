#!/usr/bin/env python
"""Benchmark: batched generation (one left-padded batch of 8) against one prompt at a time.

Builds a small random LLaMA itself (default: the demo's shape, hidden 64, 2 layers, vocabulary 1190
as the demo Chinese-Alpaca; float32 on the CPU, one thread), makes 8 prompts of 12 to 40 tokens, and
generates
--new-tokens tokens greedily for each (no EOS, so every run produces the same number of tokens)
through llamaforge's Generator, the code behind scripts/inference.py: once as 8 separate calls,
once as one batch of 8. Prints the median tokens/s of each over --repeat runs (after a warm-up),
the ratio, and whether both gave the same token ids (they must, under greedy decoding).
Exits 1 when the ratio is below --min-ratio (default 3) or the ids differ. Not a test: run it by
hand.

One thread by default: on a shared 2-core machine two OpenMP threads wait on each other whenever
another process takes a core, which slows both routes 5-10x and makes the numbers noise. The gain
shrinks as the model grows and the CPU becomes compute-bound (one thread, 32 new tokens, this
machine: hidden 64/2 layers 5.6x, hidden 128/2 layers 3.8x, hidden 512/4 layers/vocab 32000 3.9x,
hidden 1024/4 layers/vocab 32000 3.1x); on a GPU it is far larger.

    python benchmarks/generate.py
    python benchmarks/generate.py --hidden 512 --layers 4 --heads 8 --vocab 32000 --threads 0
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
runpy.run_path(str(ROOT / "scripts" / "_pathfix.py"))  # this checkout's src/ first, as the scripts do


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaforge.generate import GenerationSettings, Generator, Loaded

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early: every run makes --new-tokens tokens
    # Generator only needs the special ids of a tokenizer; no EOS, so every run makes --new-tokens tokens
    tok = SimpleNamespace(pad_token_id=0, unk_token_id=0, eos_token_id=None, bos_token_id=1)
    loaded = Loaded(model, tok, "cpu", torch.float32, args.vocab, 512)
    settings = GenerationSettings(do_sample=False, max_new_tokens=args.new_tokens)
    gen = Generator(loaded, settings)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [[1] + torch.randint(3, args.vocab, (n,), generator=g).tolist()
               for n in torch.linspace(12, 40, args.batch).round().int().tolist()]
    params = sum(p.numel() for p in model.parameters())
    return gen, prompts, params


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1190)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-ratio", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default (all cores)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    gen, prompts, params = build(args)
    tokens = args.batch * args.new_tokens
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {params / 1e6:.1f}M parameters, "
          f"float32, {torch.get_num_threads()} threads; {args.batch} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {args.new_tokens} new tokens each (greedy)")

    def one_at_a_time():
        return [gen.generate_ids([p])[0] for p in prompts]

    def batched():
        return gen.generate_ids(prompts)

    one_at_a_time(), batched()  # warm-up
    singles, batches = [], []
    for _ in range(args.repeat):
        t1, out1 = timed(one_at_a_time)
        t8, out8 = timed(batched)
        singles.append(t1)
        batches.append(t8)
    same = out1 == out8 and all(len(o) == args.new_tokens for o in out8)
    tps1 = tokens / statistics.median(singles)
    tps8 = tokens / statistics.median(batches)
    ratio = tps8 / tps1
    print(f"one at a time : {tps1:8.1f} tokens/s  (median of {args.repeat}: {statistics.median(singles):.3f} s "
          f"for {tokens} tokens)")
    print(f"batch of {args.batch:<5}: {tps8:8.1f} tokens/s  (median of {args.repeat}: {statistics.median(batches):.3f} s "
          f"for {tokens} tokens)")
    print(f"ratio batched / one at a time: {ratio:.2f}x (required >= {args.min_ratio:g}x)")
    print(f"identical token ids: {'yes' if same else 'NO'}")
    if not same:
        print("FAIL: batched greedy output differs from one-at-a-time output", file=sys.stderr)
        return 1
    if ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.2f} < {args.min_ratio:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
