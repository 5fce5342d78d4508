"""Import of Meta's consolidated.NN.pth folders as Hugging Face folders (the inverse of the pth export).

Inputs are made in temporary folders (see helpers.build_inputs): the demo merged with its
adapters, the odd-vocabulary merge, a random grouped-query-attention model.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from llamaforge.errors import LlamaforgeError
from helpers import hf_config, hf_tensors, logits, run_script

QUIET = dict(echo=lambda *a: None)


def _export(model, out, n=None):
    from llamaforge.export.pth import export_pth

    export_pth(model, out, num_shards=n, **QUIET)
    return out


@pytest.mark.parametrize("case,n", [("merged", 1), ("merged_odd", 2), ("gqa", 2)])
def test_round_trip_is_byte_identical(inputs, tmp_path, case, n):
    from llamaforge.export.meta_import import import_pth
    from llamaforge.tokenizer import check_hf_tokenizer

    model = inputs[case]
    meta = _export(model, tmp_path / "pth", n)
    if case == "gqa":  # 515 embedding rows, 512 pieces: the import wants a tokenizer as long as the rows
        _pad_tokenizer(meta / "tokenizer.model", 515)
    out = tmp_path / "hf"
    manifest = import_pth(meta, out, max_shard_size="200KB", **QUIET)
    want, got = hf_tensors(model), hf_tensors(out)
    assert set(got) == set(want)  # the same tensors (the files are sharded differently: no order to compare)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)), k  # byte-identical
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()

    a, b = hf_config(model), hf_config(out)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert a[key] == b[key], key
    theta = (a.get("rope_parameters") or {}).get("rope_theta", a.get("rope_theta"))
    assert b["rope_theta"] == theta and b["torch_dtype"] == "float16" and b["tie_word_embeddings"] is False
    assert (out / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    assert check_hf_tokenizer(out)["lines"] > 0  # transformers loads it: right length, BOS first
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir() if f.name != "llamaforge.json"}
    assert manifest["outputs_sha256"] == files
    assert torch.equal(logits(out), logits(model))


def _pad_tokenizer(path, n):
    from llamaforge.tokenizer import load_proto, merge_protos

    proto = load_proto(path)
    merged, _ = merge_protos(proto, proto, [f"<extra_{i}>" for i in range(n - len(proto.pieces))])
    path.write_bytes(merged.SerializeToString())


def _llama1_release(meta, tmp_path):
    """Reshape an export like Meta's LLaMA-1 download: vocab_size -1, a rope.freqs tensor, and
    tokenizer.model one level above the model folder."""
    release = tmp_path / "LLaMA"
    folder = release / "7B"
    folder.mkdir(parents=True)
    for f in meta.glob("consolidated.*.pth"):
        sd = torch.load(f, weights_only=True)
        sd["rope.freqs"] = torch.ones(8)
        torch.save(sd, folder / f.name)
    params = json.loads((meta / "params.json").read_text())
    params["vocab_size"] = -1
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(meta / "tokenizer.model", release / "tokenizer.model")
    return folder


def test_meta_release_layout(inputs, tmp_path):
    from llamaforge.export.meta_import import import_pth

    folder = _llama1_release(_export(inputs["merged_odd"], tmp_path / "pth", 2), tmp_path)
    out = tmp_path / "hf"
    import_pth(folder, out, **QUIET)
    cfg = hf_config(out)
    assert cfg["vocab_size"] == 1189  # from the tok_embeddings rows
    assert cfg["max_position_embeddings"] == 2048  # LLaMA-1 (norm_eps 1e-6)
    want, got = hf_tensors(inputs["merged_odd"]), hf_tensors(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_works_on_an_imported_base(inputs, tmp_path):
    """A Meta base goes through import, then the merge, exactly as the Hugging Face base does."""
    from llamaforge.export.meta_import import import_pth
    from llamaforge.merge.run import merge_lora

    demo = inputs["demo"]
    imported = tmp_path / "imported"
    import_pth(_export(demo / "base", tmp_path / "pth"), imported, **QUIET)
    loras = [demo / "lora_llama_plus", demo / "lora_alpaca_plus"]
    merge_lora(imported, loras, tmp_path / "from-meta", progress=False, **QUIET)
    want, got = hf_tensors(inputs["merged"]), hf_tensors(tmp_path / "from-meta")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_pth_file_reads_without_memory_map(inputs, tmp_path):
    from llamaforge.export.meta_import import PthFile

    meta = _export(inputs["gqa"], tmp_path / "pth", 2)
    ref = torch.load(meta / "consolidated.01.pth", weights_only=True)
    f = PthFile(meta / "consolidated.01.pth")
    try:
        assert f.keys() == list(ref)
        for k, v in ref.items():
            assert torch.equal(f.get(k), v), k
        buf = torch.empty(64, dtype=torch.uint8)
        w = ref["layers.1.attention.wq.weight"].reshape(-1)
        assert torch.equal(f.read_flat("layers.1.attention.wq.weight", 100, 20, buf), w[100:120])
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------
# bad inputs: one line naming the file and the fix, and no output


def _assert_one_line(e, *parts):
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    for p in parts:
        assert str(p) in msg, msg


def test_missing_params_json(inputs, tmp_path):
    from llamaforge.export.meta_import import import_pth

    meta = _export(inputs["merged"], tmp_path / "pth")
    (meta / "params.json").unlink()
    with pytest.raises(LlamaforgeError, match="no params.json") as e:
        import_pth(meta, tmp_path / "hf", **QUIET)
    _assert_one_line(e, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pth"]


def test_corrupt_pth(inputs, tmp_path):
    from llamaforge.export.meta_import import import_pth

    meta = _export(inputs["merged"], tmp_path / "pth")
    shard = meta / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a download cut in half
    with pytest.raises(LlamaforgeError, match="cannot read the Meta checkpoint with torch.load") as e:
        import_pth(meta, tmp_path / "hf", **QUIET)
    _assert_one_line(e, shard)
    shard.write_bytes(b"not a zip file at all" * 10)
    with pytest.raises(LlamaforgeError, match="cannot read the Meta checkpoint with torch.load"):
        import_pth(meta, tmp_path / "hf", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pth"]


def test_missing_shard_and_wrong_tokenizer(inputs, tmp_path):
    from llamaforge.export.meta_import import import_pth

    meta = _export(inputs["merged_odd"], tmp_path / "pth", 2)
    moved = tmp_path / "consolidated.00.pth"
    shutil.move(meta / "consolidated.00.pth", moved)
    with pytest.raises(LlamaforgeError, match="consolidated.00.pth is missing") as e:
        import_pth(meta, tmp_path / "hf", **QUIET)
    _assert_one_line(e, meta)
    shutil.move(moved, meta / "consolidated.00.pth")
    shutil.copy(inputs["demo"] / "sp" / "base.model", meta / "tokenizer.model")  # 512 pieces, 1189 rows
    with pytest.raises(LlamaforgeError, match="512 pieces but the embeddings have 1189 rows") as e:
        import_pth(meta, tmp_path / "hf", **QUIET)
    _assert_one_line(e, meta / "tokenizer.model")
    assert not (tmp_path / "hf").exists()


def test_params_disagree_with_tensors(inputs, tmp_path):
    from llamaforge.export.meta_import import import_pth

    meta = _export(inputs["gqa"], tmp_path / "pth")
    params = json.loads((meta / "params.json").read_text())
    params.pop("n_kv_heads")  # as if it were not GQA
    (meta / "params.json").write_text(json.dumps(params))
    with pytest.raises(LlamaforgeError, match="params.json implies") as e:
        import_pth(meta, tmp_path / "hf", **QUIET)
    _assert_one_line(e, "layers.0.attention.wk.weight")
    assert not (tmp_path / "hf").exists()


def test_import_script_one_line_error(tmp_path):
    (tmp_path / "meta").mkdir()
    r = run_script("import_pth.py", "--input", tmp_path / "meta", "--output", tmp_path / "hf")
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("llamaforge: error:") and "params.json" in lines[-1]
    assert "Traceback" not in r.stderr and not (tmp_path / "hf").exists()
