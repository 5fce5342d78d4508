#!/usr/bin/env python
"""Benchmark: llamaforge's 4-6 bit GGUF exports against llama.cpp's own quantize of the same F16
file, side by side in one run.

Synthesizes a merged-like float16 LLaMA with benchmarks/merge.py's synthesizer (default shape
"small": hidden 512, 4 layers, vocabulary 32000; --shape default is 2.5 GB), writes llamaforge's
F16 GGUF of it once, then for each --qtype runs, each in its own process and in turn (the order
alternated every round):

  llama-quantize   a bare `llama_model_quantize(f16, out, ftype)` (what llama.cpp's llama-quantize
                   does; the peer)
  --from-f16       scripts/export_gguf.py --from-f16 F16 --outtype Q (the workflow's rule: the
                   quantizer plus the guard, hashing, fallback report and Modelfile)
  from the model   scripts/export_gguf.py --outtype Q (an F16 scratch file written first)

Prints the median wall time and peak RSS (the child's ru_maxrss) of --repeat runs with a warm page
cache, the ratios to llama-quantize, and whether the outputs' tensors are identical. Not a test.

    python benchmarks/quantize.py [--shape small] [--qtype q4_k_m --qtype q6_k] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llamaforge_bench_merge", ROOT / "benchmarks" / "merge.py")
bench_merge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_merge)

PEER = (
    "import ctypes, os, sys, llama_cpp\n"
    "p = llama_cpp.llama_model_quantize_default_params()\n"
    "p.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3].upper())\n"
    "sys.exit(llama_cpp.llama_model_quantize(os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]), ctypes.byref(p)))\n"
)


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(bench_merge.SHAPES), default="small")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--qtype", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamaforge-bench-quantize")
    args = ap.parse_args()
    qtypes = args.qtype or ["q4_k_m", "q6_k"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--synthesize-only", "--shape", args.shape,
                    "--vocab", str(args.vocab), "--new-vocab", str(args.vocab), "--workdir", str(args.workdir)],
                   check=True)
    model = args.workdir / args.shape / "base"
    py = sys.executable
    f16 = args.workdir / f"{args.shape}-{args.vocab}-f16.gguf"
    if not f16.is_file():
        subprocess.run([py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model), "--output", str(f16),
                        "--outtype", "f16", "--no-modelfile"], check=True, capture_output=True)
    print(f"model: {model} ({bench_merge.du(model) / 1e9:.2f} GB), F16 GGUF {f16.stat().st_size / 1e9:.2f} GB")
    for q in qtypes:
        outs = {name: args.workdir / f"{name.replace(' ', '_').replace('-', '')}-{q}.gguf"
                for name in ("llama-quantize", "--from-f16", "from the model")}
        routes = {
            "llama-quantize": [py, "-c", PEER, str(f16), str(outs["llama-quantize"]), q],
            "--from-f16": [py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model), "--from-f16",
                           str(f16), "--output", str(outs["--from-f16"]), "--outtype", q],
            "from the model": [py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(model), "--output",
                               str(outs["from the model"]), "--outtype", q],
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
        for i in range(args.repeat):
            order = list(routes) if i % 2 == 0 else list(reversed(routes))
            for name in order:
                for stale in outs[name].parent.glob(outs[name].name + "*"):
                    stale.unlink()
                results[name].append(bench_merge.run(routes[name]))
        ref = tensors(outs["llama-quantize"])
        peer_t = statistics.median(t for t, _ in results["llama-quantize"])
        peer_m = statistics.median(m for _, m in results["llama-quantize"])
        print(f"\n{q}: median of {args.repeat}, with sync")
        print(f"{'route':16} {'wall s':>8} {'peak RSS GB':>12} {'x peer time':>12} {'x peer RSS':>11} {'tensors':>10}")
        for name, rs in results.items():
            t = statistics.median(x for x, _ in rs)
            m = statistics.median(y for _, y in rs)
            same = "identical" if tensors(outs[name]) == ref else "DIFFER"
            print(f"{name:16} {t:8.2f} {m:12.2f} {t / peer_t:12.2f} {m / peer_m:11.2f} {same:>10}")


if __name__ == "__main__":
    main()
