#!/usr/bin/env python
"""Benchmark: llamaforge's importance matrix and imatrix export against llama.cpp's own tools called
bare on the same files, side by side in one run.

On SmolLM2-135M-Instruct (the tests' cached copy; --model another Hugging Face folder), writes its
F16 GGUF once, then runs, each in its own process and in turn (the order alternated every round):

  llama-imatrix            the bare tool on the F16 and the calibration text (the peer)
  scripts/imatrix.py       --from-f16 F16 --text T (the workflow's rule: the tool plus the guard, the
                           F16 check, the text's sha256 and the record)
  llama-quantize --imatrix the bare tool, F16 -> --qtype with the matrix (the peer)
  export_gguf.py --imatrix --from-f16 F16 --imatrix M (the workflow's rule)

Prints the median wall time and peak RSS of --repeat runs, the ratios to the bare tool, and whether
the outputs' tensors are identical. Needs the tools: python scripts/build_tools.py. Not a test.

    python benchmarks/imatrix.py [--qtype q4_k_m] [--repeat 3] [--chunks 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


def run(cmd: list) -> tuple[float, float]:
    """Wall seconds (output synced to disk) and the child's peak RSS (GB); its log goes to a file
    (the tools write much to stderr: a pipe would fill and stall them)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        p = subprocess.Popen([os.fspath(c) for c in cmd], stdout=log, stderr=log)
        _, status, ru = os.wait4(p.pid, 0)
        subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{cmd[:3]} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return wall, ru.ru_maxrss / 1e6


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    from llamaforge.export.imatrix import IMATRIX_CTX, imatrix_args
    from llamaforge.export.tools import tool

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="Hugging Face folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", type=Path, default=ROOT / "src" / "llamaforge" / "data" / "calibration_text.txt")
    ap.add_argument("--qtype", default="q4_k_m")
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamaforge-bench-imatrix")
    args = ap.parse_args()
    if args.model is None:
        from families import smollm2

        args.model = smollm2()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    f16 = w / "model-f16.gguf"
    if not f16.is_file():
        subprocess.run([py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(args.model), "--output", str(f16),
                        "--outtype", "f16", "--no-modelfile"], check=True, capture_output=True)
    ours_m, bare_m = w / "ours.imatrix.gguf", w / "bare.imatrix.gguf"
    ours_q, bare_q = w / f"ours-{args.qtype}.gguf", w / f"bare-{args.qtype}.gguf"
    t = str(args.threads)
    stages = {
        "imatrix": {
            "llama-imatrix": [tool("llama-imatrix"), *imatrix_args(f16, args.text, bare_m, args.chunks, IMATRIX_CTX,
                                                                   args.threads)],
            "scripts/imatrix.py": [py, str(ROOT / "scripts" / "imatrix.py"), "--model", str(args.model), "--from-f16",
                                   str(f16), "--text", str(args.text), "--output", str(ours_m), "--threads", t]
            + (["--chunks", str(args.chunks)] if args.chunks else []),
        },
        f"{args.qtype} with the imatrix": {
            "llama-quantize": [tool("llama-quantize"), "--imatrix", str(bare_m), str(f16), str(bare_q),
                               args.qtype.upper(), t],
            "export_gguf.py": [py, str(ROOT / "scripts" / "export_gguf.py"), "--model", str(args.model), "--from-f16",
                               str(f16), "--imatrix", str(bare_m), "--output", str(ours_q), "--outtype", args.qtype,
                               "--threads", t, "--no-modelfile"],
        },
    }
    outputs = {"llama-imatrix": bare_m, "scripts/imatrix.py": ours_m, "llama-quantize": bare_q, "export_gguf.py": ours_q}
    print(f"model: {args.model}, F16 GGUF {f16.stat().st_size / 1e6:.0f} MB, text {args.text} "
          f"({args.text.stat().st_size} bytes), {args.threads} threads")
    for stage, routes in stages.items():
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in routes}
        for i in range(args.repeat):
            for name in (list(routes) if i % 2 == 0 else list(reversed(routes))):
                out = outputs[name]
                for stale in out.parent.glob(out.name + "*"):
                    stale.unlink()
                results[name].append(run(routes[name]))
        peer = next(iter(routes))
        ref = tensors(outputs[peer])
        peer_t = statistics.median(x for x, _ in results[peer])
        peer_m = statistics.median(y for _, y in results[peer])
        print(f"\n{stage}: median of {args.repeat}")
        print(f"{'route':20} {'wall s':>8} {'peak RSS GB':>12} {'x peer time':>12} {'x peer RSS':>11} {'tensors':>10}")
        for name, rs in results.items():
            tt = statistics.median(x for x, _ in rs)
            m = statistics.median(y for _, y in rs)
            same = "identical" if tensors(outputs[name]) == ref else "DIFFER"
            print(f"{name:20} {tt:8.2f} {m:12.2f} {tt / peer_t:12.2f} {m / peer_m:11.2f} {same:>10}")


if __name__ == "__main__":
    main()
