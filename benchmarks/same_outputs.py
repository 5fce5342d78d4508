#!/usr/bin/env python
"""A refactor proves itself: the same inputs through two checkouts give byte-identical outputs.

Builds, with each checkout's own scripts (each its own process, its own src/), every kind of
output from the same inputs, and compares the sha256 of every output file:

  merged/      scripts/merge_lora.py   (demo: base + LLaMA-Plus + Alpaca-Plus; the shape's base + its adapter)
  pth1/ pth2/  scripts/export_pth.py   --num-shards 1 and 2
  *.gguf       scripts/export_gguf.py  --outtype f16, bf16, q8_0
  imported/    scripts/import_pth.py   of pth2/

Inputs: the demo (llamaforge.demo, from the NEW checkout) and, with --shape, a synthetic base
and adapter of benchmarks/merge.py (default shape: 2.5 GB). Not a test: run it by hand.

    python benchmarks/same_outputs.py --old /tmp/old-checkout            # demo only
    python benchmarks/same_outputs.py --old /tmp/old-checkout --shape default
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build(checkout: Path, inputs: dict, out: Path) -> dict[str, str]:
    """Every output of `inputs` made by `checkout`'s scripts under `out`; sha256 by relative path."""
    py = [sys.executable]

    def script(name, *args):
        subprocess.run([*py, str(checkout / "scripts" / name), *map(str, args)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    out.mkdir(parents=True)
    script("merge_lora.py", "--base", inputs["base"], *[a for lo in inputs["loras"] for a in ("--lora", lo)],
           "--output", out / "merged", "--no-progress")
    script("export_pth.py", "--model", out / "merged", "--output", out / "pth1", "--num-shards", 1)
    script("export_pth.py", "--model", out / "merged", "--output", out / "pth2", "--num-shards", 2)
    for t in ("f16", "bf16", "q8_0"):
        script("export_gguf.py", "--model", out / "merged", "--output", out / f"m-{t}.gguf", "--outtype", t)
    script("import_pth.py", "--input", out / "pth2", "--output", out / "imported")
    digests = {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            # the manifests name the output folder, which differs between the two builds
            digests[f.relative_to(out).as_posix()] = sha256(f) if f.name != "llamaforge.json" else "(manifest)"
    return digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (e.g. a git worktree of HEAD~1)")
    ap.add_argument("--shape", default=None, help="also a synthetic model of benchmarks/merge.py's SHAPES")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamaforge-same-outputs")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    runpy.run_path(str(ROOT / "scripts" / "_pathfix.py"))  # this checkout's src/ first, as the scripts do
    from llamaforge.demo import make_demo

    cases = {}
    demo = args.workdir / "inputs" / "demo"
    make_demo(demo, seed=42, echo=lambda *a: None)
    cases["demo"] = {"base": demo / "base", "loras": [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]}
    if args.shape:
        spec = importlib.util.spec_from_file_location("llamaforge_bench_merge", ROOT / "benchmarks" / "merge.py")
        bm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bm)

        base, lora = bm.synthesize(args.workdir / "inputs" / args.shape, args.shape, 32000, 49953, 8)
        cases[args.shape] = {"base": base, "loras": [lora]}
    bad = 0
    for name, inputs in cases.items():
        new = build(ROOT, inputs, args.workdir / "new" / name)
        old = build(args.old.resolve(), inputs, args.workdir / "old" / name)
        same = [k for k in new if old.get(k) == new[k]]
        diff = sorted(set(new) ^ set(old) | {k for k in new if k in old and old[k] != new[k]})
        print(f"{name}: {len(same)} of {len(new)} files identical" + (f"; DIFFERENT: {diff}" if diff else ""))
        bad += len(diff)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
