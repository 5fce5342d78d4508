#!/usr/bin/env python
"""Benchmark: the Hugging Face tokenizer llamaforge writes for a merged SentencePiece vocabulary
against sentencepiece itself (the peer, and the definition of right), side by side in one run.

Merges the real LLaMA and Chinese SentencePiece models of ../shared/fixtures (Chinese-Alpaca, 49954
pieces) with scripts/merge_tokenizers.py, builds ~1 MB of mixed text (the bundled Chinese and
English samples, digit runs, whitespace runs, emoji), then times, in this process and in turn:

  sentencepiece   SentencePieceProcessor(tokenizer.model).encode(lines)          the peer
  autotokenizer   AutoTokenizer.from_pretrained(folder)(lines) -- what llamaforge writes
                  (transformers 5's SentencePiece backend: exact)
  tokenizer.json  PreTrainedTokenizerFast(tokenizer_file=folder/tokenizer.json)(lines) -- the
                  tokenizers-BPE file, for tools that read it alone (fast, but inexact)

Prints load time, encode time (median of --repeat) and tokens per second, their ratios to
sentencepiece, and how many lines each encodes differently from sentencepiece. Not a test.

    python benchmarks/tokenizer.py [--repeat 3] [--mb 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "tokenizers"


def corpus(mb: float, seed: int = 0) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from llamaforge.tokenizer import bundled_text

    rng = random.Random(seed)
    base = [s for s in (bundled_text("chinese.txt") + "\n" + bundled_text("english.txt")).splitlines() if s.strip()]
    extra = ["1234567890", "33333 44444", "2023年10月1日", "3.14159265358979", "a    b", "   indented",
             "😀👍🏽 emoji 🇨🇳", "tabs\tand\tspaces  ", "北京2008奥运会", "11111111111111111111"]
    lines, size = [], 0
    while size < mb * 1e6:
        line = rng.choice(base) if rng.random() < 0.85 else rng.choice(extra) + " " + rng.choice(base)[:40]
        lines.append(line)
        size += len(line.encode("utf-8"))
    return lines


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=float, default=1.0)
    args = ap.parse_args()
    import sentencepiece as spm
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "chinese-alpaca"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_tokenizers.py"), "--base",
                        str(FIXTURES / "llama" / "tokenizer.model"), "--extra", str(FIXTURES / "chinese_sp.model"),
                        "--add-token", "[PAD]", "--output", str(out)], check=True, capture_output=True)
        lines = corpus(args.mb)
        routes = {
            "sentencepiece": lambda: spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")),
            "autotokenizer": lambda: AutoTokenizer.from_pretrained(out),
            "tokenizer.json": lambda: PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json")),
        }
        results = {}
        for name, load in routes.items():
            t_load, tok = timed(load, args.repeat)
            if name == "sentencepiece":
                t_enc, ids = timed(lambda tok=tok: tok.encode(lines), args.repeat)
            else:
                t_enc, enc = timed(lambda tok=tok: tok(lines, add_special_tokens=False).input_ids, args.repeat)
                ids = enc
            results[name] = (t_load, t_enc, ids)
        ref = results["sentencepiece"][2]
        n_tokens = sum(len(x) for x in ref)
        print(f"{len(lines)} lines, {sum(len(s.encode()) for s in lines) / 1e6:.2f} MB, {n_tokens} tokens "
              f"(sentencepiece), median of {args.repeat}")
        print(f"{'route':16} {'load s':>8} {'encode s':>9} {'Mtok/s':>7} {'x sp time':>10} {'lines != sp':>12}")
        sp_enc = results["sentencepiece"][1]
        for name, (t_load, t_enc, ids) in results.items():
            wrong = sum(a != b for a, b in zip(ids, ref))
            print(f"{name:16} {t_load:8.3f} {t_enc:9.3f} {n_tokens / t_enc / 1e6:7.2f} {t_enc / sp_enc:10.2f} "
                  f"{wrong:>6}/{len(lines)}")


if __name__ == "__main__":
    main()
