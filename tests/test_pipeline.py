"""The whole pipeline through the snakemake CLI, in a fresh copy of the workflow, on the demo."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from helpers import copy_workflow, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_build")]  # one worker, one build


# `built`: this module's copy of the session's demo build (conftest.py)


def test_second_run_has_nothing_to_do(built):
    proc = snakemake(built, "--cores", "2", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean(built):
    proc = snakemake(built, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tokenizers_hold_the_merged_vocabularies(built):
    import sentencepiece as spm

    from llamaforge.tokenizer import load_hf_tokenizer

    base = spm.SentencePieceProcessor(model_file=str(built / "resources/demo/sp/base.model"))
    extra = spm.SentencePieceProcessor(model_file=str(built / "resources/demo/sp/chinese.model"))
    base_pieces = {base.id_to_piece(i) for i in range(base.get_piece_size())}
    new = [extra.id_to_piece(i) for i in range(extra.get_piece_size()) if extra.id_to_piece(i) not in base_pieces]
    sizes = {}
    for name, extra_tokens in (("demo-llama", []), ("demo-alpaca", ["[PAD]"])):
        folder = built / "tokenizers" / name
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert pieces == [base.id_to_piece(i) for i in range(base.get_piece_size())] + new + extra_tokens
        tok = load_hf_tokenizer(folder)
        assert len(tok) == len(pieces)
        assert tok("白日依山尽").input_ids[0] == 1
        sizes[name] = len(pieces)
        report = json.loads((folder / "merge_report.json").read_text())
        assert report["merged_pieces"] == len(pieces)
    assert sizes["demo-alpaca"] == sizes["demo-llama"] + 1
    assert json.loads((built / "tokenizers/demo-alpaca/special_tokens_map.json").read_text())["pad_token"] == "[PAD]"


def test_merged_models_are_complete_and_fit_their_tokenizers(built):
    from safetensors import safe_open

    for model, tokenizer, n_adapters in (("demo-llama", "demo-llama", 1), ("demo", "demo-alpaca", 2)):
        folder = built / "merged" / model
        cfg = json.loads((folder / "config.json").read_text())
        manifest = json.loads((folder / "llamaforge.json").read_text())
        assert len(manifest["adapters"]) == n_adapters
        assert (folder / "tokenizer.model").read_bytes() == (built / "tokenizers" / tokenizer / "tokenizer.model").read_bytes()
        for name, digest in manifest["outputs_sha256"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        shards = sorted(folder.glob("*.safetensors"))
        with safe_open(str(shards[0]), "pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == cfg["vocab_size"]
        assert cfg["vocab_size"] == manifest["tokenizer"]["length"]
    # demo-llama is configured with a small max_shard_size: a sharded output with an index
    assert (built / "merged/demo-llama/model.safetensors.index.json").is_file()
    assert len(list((built / "merged/demo-llama").glob("model-*-of-*.safetensors"))) >= 2


def test_every_rule_logged(built):
    logs = {p.relative_to(built / "logs").as_posix() for p in (built / "logs").rglob("*.log")}
    assert {"demo/make_demo.log", "tokenizers/demo-llama.log", "tokenizers/demo-alpaca.log",
            "merge/demo.log", "merge/demo-llama.log"} <= logs
    assert "New model pieces" in (built / "logs/tokenizers/demo-alpaca.log").read_text()


def test_evaluation_proves_each_merge_and_predicts(built):
    for model in ("demo-llama", "demo"):
        eq = json.loads((built / "eval" / model / "equivalence.json").read_text())
        assert eq["passed"] is True
        assert eq["max_abs_diff"] <= eq["tolerance"] + 2 * eq["rounding_floor"]
        preds = json.loads((built / "eval" / model / "predictions.json").read_text())
        prompts = [line for line in (built / "src/llamaforge/data/eval_prompts.txt").read_text().splitlines()
                   if line.strip()]
        assert [p["instruction"] for p in preds] == prompts
        assert all(p["prompt"].endswith("### Response:\n\n") or "Response" in p["prompt"] for p in preds)
        ppl = json.loads((built / "eval" / model / "perplexity.json").read_text())
        assert ppl["perplexity"] > 1
        stats = json.loads((built / "eval" / model / "tokenizer_stats.json").read_text())
        assert stats["merged"]["chars_per_token"] > stats["base"]["chars_per_token"]


def test_report_embeds_the_plots(built):
    snakemake(built, "--report", "report.html")
    html = (built / "report.html").read_text()
    for plot in ("tokens_per_char.png", "perplexity.png", "equivalence.png"):
        assert f"filename={plot};base64,iVBORw0KGgo" in html, plot


def test_exports_are_readable_and_checksummed(built):
    import gguf
    import torch

    from llamaforge.tokenizer import load_proto

    for model in ("demo-llama", "demo"):
        cfg = json.loads((built / "merged" / model / "config.json").read_text())
        pth = built / "exports" / model / "pth"
        params = json.loads((pth / "params.json").read_text())
        assert (params["dim"], params["n_layers"], params["vocab_size"]) == (
            cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
        sd = torch.load(pth / "consolidated.00.pth", weights_only=True, mmap=True)
        assert tuple(sd["tok_embeddings.weight"].shape) == (cfg["vocab_size"], cfg["hidden_size"])
        assert "layers.0.attention.wq.weight" in sd and "output.weight" in sd
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=pth, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        pieces = len(load_proto(built / "merged" / model / "tokenizer.model").pieces)
        for outtype in ("f16", "q8_0"):
            f = built / "exports" / model / f"{model}-{outtype}.gguf"
            reader = gguf.GGUFReader(str(f))
            assert len(reader.fields["tokenizer.ggml.tokens"].data) == pieces
            arch = reader.fields["general.architecture"]
            assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
            names = {t.name for t in reader.tensors}
            assert {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names
            check = subprocess.run(["sha256sum", "-c", f"{f.name}.sha256"], cwd=f.parent, capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr


def test_verify_target_checks_published_hashes(built, tmp_path):
    target = "exports/demo/pth/consolidated.00.pth"
    good = hashlib.sha256((built / target).read_bytes()).hexdigest()
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"models:\n  demo:\n    sha256:\n      {target}: {good}\n")
    snakemake(built, "verify/demo", "--cores", "1", "--configfile", "config.yaml", str(ok))
    assert good in (built / "verify/demo").read_text()
    bad = tmp_path / "bad.yaml"
    wrong = "ab" * 32
    bad.write_text(f"models:\n  demo:\n    sha256:\n      {target}: {wrong}\n")
    proc = snakemake(built, "verify/demo", "--cores", "1", "--forcerun", "verify", "--configfile", "config.yaml",
                     str(bad), check=False)
    assert proc.returncode != 0
    log = (built / "logs/verify/demo.log").read_text()
    assert target in log and wrong in log and good in log
    assert not (built / "verify/demo").exists()


# --- config paths are checked when the workflow is parsed --------------------------------------


def _with_config(wf, edit):
    import yaml

    path = wf / "config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return original


def _set(*keys):
    def edit(cfg, value):
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


@pytest.mark.parametrize("key,path,edit", [
    ("models.demo.loras[1]", "resources/demo/lora_gone", _set("models", "demo", "loras", 1)),
    ("models.demo-llama.base", "no such/base ü", _set("models", "demo-llama", "base")),
    ("tokenizers.demo-llama.extra", "sp/missing.model", _set("tokenizers", "demo-llama", "extra")),
    ("eval.text", "eval texts/missing.txt", _set("eval", "text")),
])
def test_a_missing_config_path_stops_the_dry_run_with_its_key(built, key, path, edit):
    """After a build, a config naming a missing input stops `snakemake -n` (and any run) at parse
    time with one line naming the key and the path, and the built outputs stay as they were."""
    merged = {p.name: p.stat().st_mtime_ns for p in (built / "merged" / "demo").iterdir()}
    original = _with_config(built, lambda c: edit(c, path))
    try:
        for args in (["-n"], ["--cores", "1"]):
            proc = snakemake(built, *args, check=False)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
            assert proc.returncode != 0
            assert errors == [f"llamaforge: error: config.yaml: {key}: {path} does not exist. Fix: correct the path "
                              f"under {key.split('.')[0]}: in config.yaml (paths are relative to {built}), or create "
                              f"the {'folder' if key.startswith('models') else 'file'}."], proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        (built / "config.yaml").write_text(original)
    assert {p.name: p.stat().st_mtime_ns for p in (built / "merged" / "demo").iterdir()} == merged


def test_paths_with_spaces_and_non_ascii_build(built, tmp_path):
    """Every configurable path reaches its shell command quoted: a tokenizer, a base, an adapter, a
    tokenizer folder and the evaluation text under a folder with spaces and non-ASCII characters
    build a tokenizer, a merge, a GGUF export and a perplexity."""
    import shutil

    wf = copy_workflow(tmp_path / "work dir ü")
    inputs = wf / "my inputs ü"
    inputs.mkdir()
    shutil.copy(built / "resources/demo/sp/base.model", inputs / "base model.model")
    shutil.copy(built / "resources/demo/sp/chinese.model", inputs / "中文 extra.model")
    shutil.copytree(built / "resources/demo/base", inputs / "base dir")
    shutil.copytree(built / "resources/demo/lora_llama_plus", inputs / "lora ü")
    shutil.copy(built / "src/llamaforge/data/eval_text.txt", inputs / "eval text ü.txt")

    def edit(c):
        c["demo"]["enabled"] = False
        c["tokenizers"] = {"spaced": {"base": "my inputs ü/base model.model",
                                      "extra": "my inputs ü/中文 extra.model", "add_tokens": ["[PAD]"]}}
        c["models"] = {"spaced": {"base": "my inputs ü/base dir", "loras": ["my inputs ü/lora ü"],
                                  "tokenizer": "my inputs ü/lora ü", "exports": ["hf", "gguf-f16"]}}
        c["eval"]["text"] = "my inputs ü/eval text ü.txt"

    _with_config(wf, edit)
    snakemake(wf, "--cores", "2", "tokenizers/spaced", "merged/spaced", "exports/spaced/spaced-f16.gguf",
              "eval/spaced/perplexity.json")
    report = json.loads((wf / "tokenizers/spaced/merge_report.json").read_text())
    assert report["base"] == "my inputs ü/base model.model"
    assert (wf / "tokenizers/spaced/tokenizer.model").read_bytes() == \
        (built / "tokenizers/demo-alpaca/tokenizer.model").read_bytes()
    manifest = json.loads((wf / "merged/spaced/llamaforge.json").read_text())
    assert manifest["adapters"][0]["path"] == "my inputs ü/lora ü"
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    got, want = weights(wf / "merged/spaced"), weights(built / "merged/demo-llama")  # the same base + adapter
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert (wf / "exports/spaced/spaced-f16.gguf.sha256").read_text().split()[1] == "spaced-f16.gguf"
    assert json.loads((wf / "eval/spaced/perplexity.json").read_text())["text"].endswith("eval text ü.txt")
