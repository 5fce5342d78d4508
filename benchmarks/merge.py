#!/usr/bin/env python
"""Benchmark: llamaforge's streaming merge against PEFT's merge_and_unload and `cp -r`.

Synthesizes a float16 LLaMA base at a realistic shape (default: hidden 2048, intermediate 5504,
22 layers, vocabulary 32000, ~2.2 GB, two safetensors shards) and a Chinese-style adapter (r=8 on
every projection, full embed_tokens/lm_head with 49953 rows, float16, a 49953-piece tokenizer),
then runs, each in its own process and in turn:

  llamaforge   scripts/merge_lora.py
  peft         from_pretrained(float16, low_cpu_mem_usage) -> resize_token_embeddings(49953,
               mean_resizing=False) -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained
  cp           cp -r of the base folder (the floor: copying the same bytes)

Every route's time includes a `sync`, so each output has reached the disk.

and prints the median wall time and peak RSS of each (of --repeat runs, warm page cache) and the
ratios. Peak RSS is the child's own ru_maxrss (os.wait4). Not a test: run it by hand.

    python benchmarks/merge.py                       # default shape, all three
    python benchmarks/merge.py --shape 7b --skip-peft  # hidden 4096, 11008, 32 layers (13.5 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
runpy.run_path(str(ROOT / "scripts" / "_pathfix.py"))  # this checkout's src/ first, as the scripts do

SHAPES = {
    "default": dict(hidden=2048, intermediate=5504, layers=22, heads=16, kv_heads=16),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "small": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tensor_shapes(s, vocab):
    h, i, kv = s["hidden"], s["intermediate"], s["hidden"] * s["kv_heads"] // s["heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def synthesize(root: Path, shape: str, vocab: int, new_vocab: int, r: int) -> tuple[Path, Path]:
    import torch

    from llamaforge.demo import synthetic_sp_model
    from llamaforge.formats.safetensors import ShardedSafetensorsWriter, plan_shards
    from llamaforge.formats.dtypes import TensorInfo

    s = SHAPES[shape]
    base, lora = root / "base", root / "lora"
    tag = root / f".done-{shape}-{vocab}-{new_vocab}-{r}"
    if tag.exists():
        return base, lora
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(lora, ignore_errors=True)
    base.mkdir(parents=True)
    lora.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = _tensor_shapes(s, vocab)
    infos = [TensorInfo(n, torch.float16, sh) for n, sh in shapes]
    total = sum(t.nbytes for t in infos)
    w = ShardedSafetensorsWriter(base, plan_shards(infos, total // 2 + 1))
    for n, sh in shapes:
        t = torch.ones(sh) if n.endswith("norm.weight") else torch.randn(sh, generator=g) * 0.02
        w.write(n, t.half())
    w.close()
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
        "rope_theta": 10000.0,
    }
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    (base / "tokenizer.model").write_bytes(synthetic_sp_model(vocab))
    # the adapter, with PEFT's key names
    from safetensors.torch import save_file

    h = s["hidden"]
    kv = h * s["kv_heads"] // s["heads"]
    sd = {}
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (s["intermediate"], h), "up_proj": (s["intermediate"], h), "down_proj": (h, s["intermediate"])}
    for n in range(s["layers"]):
        for proj in PROJ:
            out_f, in_f = dims[proj]
            mod = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            k = f"base_model.model.model.layers.{n}.{mod}.{proj}"
            sd[f"{k}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) * 0.01).half()
            sd[f"{k}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.01).half()
    sd["base_model.model.model.embed_tokens.weight"] = (torch.randn(new_vocab, h, generator=g) * 0.02).half()
    sd["base_model.model.lm_head.weight"] = (torch.randn(new_vocab, h, generator=g) * 0.02).half()
    save_file(sd, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    del sd
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": PROJ, "modules_to_save": ["embed_tokens", "lm_head"], "fan_in_fan_out": False,
        "bias": "none", "inference_mode": True, "base_model_name_or_path": str(base),
    }, indent=2))
    (lora / "tokenizer.model").write_bytes(synthetic_sp_model(new_vocab))
    tag.touch()
    return base, lora


PEFT_ROUTE = r"""
import sys, torch
from transformers import LlamaForCausalLM
from peft import PeftModel
base, lora, out, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16, low_cpu_mem_usage=True)
model.resize_token_embeddings(vocab, mean_resizing=False)
model = PeftModel.from_pretrained(model, lora)
model = model.merge_and_unload()
model.save_pretrained(out, safe_serialization=True)
"""


def run(cmd: list[str], env=None, sync: bool = True) -> tuple[float, float]:
    """Wall seconds (including `sync` unless sync=False: every route's output reaches the disk) and
    peak RSS (GB). Without the sync the page cache absorbs the writes: the CPU-bound regime."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    if sync:
        subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return wall, ru.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--new-vocab", type=int, default=49953)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-peft", action="store_true", help="PEFT needs ~2x the model in RAM: skip it at 7B")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llamaforge-bench-merge")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--synthesize-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout (e.g. a git worktree of the previous commit): its merge runs beside this one")
    ap.add_argument("--no-sync", action="store_true",
                    help="time without the final sync: the page cache absorbs the writes (the CPU-bound regime)")
    args = ap.parse_args()
    if args.synthesize_only:
        synthesize(args.workdir / args.shape, args.shape, args.vocab, args.new_vocab, args.rank)
        return

    work = args.workdir / args.shape
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Synthesize in a child process: this driver must stay small, because a child forked from a
    # large process reports the parent's resident size as its own peak (ru_maxrss).
    subprocess.run([sys.executable, __file__, "--synthesize-only", "--shape", args.shape, "--vocab", str(args.vocab),
                    "--new-vocab", str(args.new_vocab), "--rank", str(args.rank), "--workdir", str(args.workdir)],
                   check=True)
    base, lora = work / "base", work / "lora"
    print(f"inputs: {base} ({du(base) / 1e9:.2f} GB), {lora} ({du(lora) / 1e9:.2f} GB) "
          f"[{time.perf_counter() - t0:.0f} s to synthesize or reuse]", flush=True)

    out = work / "out"
    routes = {
        "llamaforge": lambda: [sys.executable, str(ROOT / "scripts" / "merge_lora.py"), "--base", str(base),
                               "--lora", str(lora), "--output", str(out), "--no-progress"],
        "peft": lambda: [sys.executable, "-c", PEFT_ROUTE, str(base), str(lora), str(out), str(args.new_vocab)],
        "cp": lambda: ["cp", "-r", str(base), str(out)],
    }
    if args.before:
        routes = {"llamaforge": routes["llamaforge"],
                  "before": lambda: [sys.executable, str(args.before.resolve() / "scripts" / "merge_lora.py"),
                                     "--base", str(base), "--lora", str(lora), "--output", str(out), "--no-progress"],
                  **{k: v for k, v in routes.items() if k != "llamaforge"}}
    if args.skip_peft:
        routes.pop("peft")
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in routes}
    subprocess.run(["cat"] + [str(f) for f in base.iterdir()] + [str(f) for f in lora.iterdir()],
                   stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    # One untimed merge first: it hashes the inputs into ~/.cache/llamaforge (every later merge of
    # either checkout reuses them), so no timed route pays that one-time cost for the others.
    warm = [r for r in routes if r in ("llamaforge", "before")][:1]
    for name in warm:
        shutil.rmtree(out, ignore_errors=True)
        run(routes[name](), sync=False)
    for i in range(args.repeat):
        # every other round in reverse order: no route always follows the same one
        for name, cmd in (list(routes.items()) if i % 2 == 0 else list(routes.items())[::-1]):
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            wall, rss = run(cmd(), sync=not args.no_sync)
            results[name].append((wall, rss))
            print(f"  run {i + 1} {name:<10} {wall:7.1f} s  {rss:6.2f} GB peak RSS", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    print(f"\nshape {args.shape}: {SHAPES[args.shape]}, vocab {args.vocab} -> {args.new_vocab}, r={args.rank}, "
          f"median of {args.repeat}, " + ("no sync (page cache absorbs the writes)" if args.no_sync else "with sync"))
    print(f"{'route':<12}{'wall s':>10}{'peak RSS GB':>14}")
    for k, (w, r) in med.items():
        print(f"{k:<12}{w:>10.1f}{r:>14.2f}")
    lf = med["llamaforge"]
    ratios = {"wall_vs_cp": lf[0] / med["cp"][0]}
    print(f"\nllamaforge / cp    wall {ratios['wall_vs_cp']:.2f}x")
    if "before" in med:
        ratios["before_wall_vs_cp"] = med["before"][0] / med["cp"][0]
        print(f"before / cp        wall {ratios['before_wall_vs_cp']:.2f}x   (this checkout / before: "
              f"wall {lf[0] / med['before'][0]:.2f}x, peak RSS {lf[1] / med['before'][1]:.2f}x)")
    if "peft" in med:
        ratios["wall_vs_peft"] = lf[0] / med["peft"][0]
        ratios["rss_vs_peft"] = lf[1] / med["peft"][1]
        print(f"llamaforge / peft  wall {ratios['wall_vs_peft']:.2f}x   peak RSS {ratios['rss_vs_peft']:.2f}x "
              f"(PEFT uses {1 / ratios['rss_vs_peft']:.1f}x the memory)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shape": args.shape, "runs": results, "median": med, "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    main()
