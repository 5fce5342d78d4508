"""Exports of a merged model to Meta consolidated.NN.pth and GGUF, SHA256SUMS and verification.

Every input is made here, in temporary folders: the embedded demo merged with its adapters
(vocabulary 1190, and 1189 for the odd N=2 split), a small random grouped-query-attention model,
and the same with tied embeddings (no lm_head.weight stored).
The Meta files are read back by an independent reader written below from Meta's rules (concatenate
the shards, permute q/k back to Hugging Face order), not with llamaforge.model.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO as ROOT
from helpers import baseline_rss, hf_config, hf_tensors, logits, peak_rss, run_script, synthesize

from llamaforge.errors import LlamaforgeError


# ---------------------------------------------------------------------------------------------
# an independent reader of Meta's format


def meta_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Meta folder -> Hugging Face state dict, by Meta's rules: column-parallel tensors (wq wk wv w1 w3,
    output) are concatenated on dim 0, row-parallel ones (wo w2) and tok_embeddings on dim 1, norms are
    taken from shard 0; q and k are permuted back as transformers' convert_llama_weights_to_hf does."""
    params = json.loads((folder / "params.json").read_text())
    files = sorted(folder.glob("consolidated.*.pth"))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    n_kv = params.get("n_kv_heads", n_heads)
    head_dim = dim // n_heads

    def cat(name, axis):
        return torch.cat([s[name] for s in shards], dim=axis) if len(shards) > 1 else shards[0][name]

    def to_hf(w, heads):  # Meta (interleaved pairs) -> HF (rotary halves)
        return w.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)

    sd = {"model.embed_tokens.weight": cat("tok_embeddings.weight", 1),
          "model.norm.weight": shards[0]["norm.weight"],
          "lm_head.weight": cat("output.weight", 0)}
    for i in range(n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        sd[h + "self_attn.q_proj.weight"] = to_hf(cat(m + "attention.wq.weight", 0), n_heads)
        sd[h + "self_attn.k_proj.weight"] = to_hf(cat(m + "attention.wk.weight", 0), n_kv)
        sd[h + "self_attn.v_proj.weight"] = cat(m + "attention.wv.weight", 0)
        sd[h + "self_attn.o_proj.weight"] = cat(m + "attention.wo.weight", 1)
        sd[h + "mlp.gate_proj.weight"] = cat(m + "feed_forward.w1.weight", 0)
        sd[h + "mlp.down_proj.weight"] = cat(m + "feed_forward.w2.weight", 1)
        sd[h + "mlp.up_proj.weight"] = cat(m + "feed_forward.w3.weight", 0)
        sd[h + "input_layernorm.weight"] = shards[0][m + "attention_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = shards[0][m + "ffn_norm.weight"]
        for s in shards[1:]:  # norms are copies
            assert torch.equal(s[m + "attention_norm.weight"], sd[h + "input_layernorm.weight"])
    return sd


def meta_ffn(params: dict) -> int:
    """Meta's FeedForward width (llama/model.py)."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params["multiple_of"]
    return m * ((hidden + m - 1) // m)


def sha256sum_check(folder: Path, sums: str) -> str:
    r = subprocess.run(["sha256sum", "-c", sums], cwd=folder, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# ---------------------------------------------------------------------------------------------
# model/: the tensor table and its rules


def test_permutations_are_inverses():
    from llamaforge.model import permute_into

    w = torch.randn(4 * 16, 24)
    # llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), written out: HF -> Meta/GGUF
    meta = w.reshape(4, 2, w.shape[0] // 4 // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    # transformers' convert_llama_weights_to_hf.py permute, the other way: Meta -> HF
    hf = meta.view(4, w.shape[0] // 4 // 2, 2, 24).transpose(1, 2).reshape(w.shape)
    assert not torch.equal(meta, w) and torch.equal(hf, w)
    out = torch.empty_like(w)
    assert torch.equal(permute_into(out, w, 4, to_meta=True), meta)
    assert torch.equal(permute_into(torch.empty_like(w), meta, 4, to_meta=False), w)


def test_table_matches_gguf_name_map():
    import gguf

    from llamaforge.model import hf_order

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    for t in hf_order(3):
        assert tmap.get_name(t.hf, try_suffixes=(".weight",)) == t.gguf, t


def test_shard_rules():
    from llamaforge.model import EMBED, LAYER, OUTPUT, default_num_shards, shard_ranges, split_sizes

    assert [default_num_shards(h) for h in (4096, 5120, 6656, 8192, 2048)] == [1, 2, 4, 8, 1]
    assert split_sizes(49953, 2, uneven=True) == [24976, 24977]
    assert split_sizes(49953, 8, uneven=True) == [6244] * 7 + [6245]
    assert shard_ranges(OUTPUT, (1189, 64), 2) == [(0, 594), (594, 1189)]
    assert shard_ranges(EMBED, (1189, 64), 2) == [(0, 32), (32, 64)]
    assert shard_ranges(LAYER[-1].at(0), (64,), 2) == [None, None]
    with pytest.raises(LlamaforgeError, match="does not divide into 3 shards"):
        shard_ranges(LAYER[0].at(0), (64, 64), 3)


@pytest.mark.parametrize("dim,ffn,expected", [
    (4096, 11008, (256, None)), (5120, 13824, (256, None)), (6656, 17920, (256, None)),  # LLaMA's own params.json
    (8192, 22016, (256, None)), (8192, 28672, (4096, 1.3)),  # LLaMA-2 70B
    (64, 176, (16, None)), (64, 200, (8, 1.176)), (2048, 5504, (128, None)), (64, 100, (4, 0.588)),
])
def test_ffn_params_reproduce_the_width(dim, ffn, expected):
    from llamaforge.model import ffn_params

    multiple_of, mult = ffn_params(dim, ffn)
    assert (multiple_of, mult) == expected
    assert meta_ffn({"dim": dim, "multiple_of": multiple_of, "ffn_dim_multiplier": mult}) == ffn
    # the closed form, as usually written (docs/ARCHITECTURE.md, params.json)
    assert multiple_of * math.ceil(int(8 * dim / 3) * (mult or 1) / multiple_of) == ffn


# ---------------------------------------------------------------------------------------------
# consolidated.NN.pth


@pytest.mark.parametrize("case,n", [("merged", 1), ("merged_odd", 2), ("gqa", 1), ("gqa", 2)])
def test_pth_export_reads_back(inputs, tmp_path, case, n):
    from llamaforge.export.pth import export_pth

    model = inputs[case]
    out = tmp_path / "pth"
    hashes = export_pth(model, out, num_shards=n, echo=lambda *a: None)
    files = sorted(p.name for p in out.iterdir())
    shards = [f"consolidated.{i:02d}.pth" for i in range(n)]
    assert files == sorted(shards + ["params.json", "tokenizer.model", "SHA256SUMS"])
    assert sorted(hashes) == sorted(shards + ["params.json", "tokenizer.model"])
    sha256sum_check(out, "SHA256SUMS")

    cfg = hf_config(model)
    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == cfg["hidden_size"] and params["n_layers"] == cfg["num_hidden_layers"]
    assert params["n_heads"] == cfg["num_attention_heads"] and params["vocab_size"] == cfg["vocab_size"]
    assert params["norm_eps"] == cfg["rms_norm_eps"]
    assert meta_ffn(params) == cfg["intermediate_size"]
    if case == "gqa":
        assert params["n_kv_heads"] == 2 and params["rope_theta"] == 500000.0 and "ffn_dim_multiplier" in params
    else:
        assert "n_kv_heads" not in params and "rope_theta" not in params

    want = hf_tensors(model)
    got = meta_state_dict(out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    if n == 2:
        s0 = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
        s1 = torch.load(out / "consolidated.01.pth", weights_only=True, mmap=True)
        vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
        assert s0["output.weight"].shape[0] == vocab // 2
        assert s1["output.weight"].shape[0] == vocab - vocab // 2  # the remainder on the last shard
        assert s0["tok_embeddings.weight"].shape == (vocab, hidden // 2)
        assert s0["layers.0.attention.wo.weight"].shape[1] == hidden // 2
    assert torch.equal(logits(model, got), logits(model))


def test_pth_is_torch_save_format(inputs, tmp_path):
    from llamaforge.export.pth import export_pth

    out = tmp_path / "pth"
    export_pth(inputs["merged"], out, echo=lambda *a: None)
    data = (out / "consolidated.00.pth").read_bytes()
    sd = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    assert list(sd)[:4] == ["tok_embeddings.weight", "norm.weight", "output.weight", "layers.0.attention.wq.weight"]
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in sd.items()}, buf)
    assert buf.getvalue() == data  # byte-identical to torch.save of the same dict


@pytest.mark.parametrize("n", [1, 2])
def test_kernel_copy_gives_the_same_bytes(inputs, tmp_path, monkeypatch, n):
    """Tensors that pass through unchanged are copied with copy_file_range (real models: >= 1 MB);
    lowering the threshold to 4 KB sends the demo's through that path: the files must not change."""
    from llamaforge import export
    from llamaforge.formats import stream

    plain = {}
    export.export_pth(inputs["merged_odd"], tmp_path / "plain", num_shards=n, echo=lambda *a: None)
    export.export_gguf(inputs["merged_odd"], tmp_path / "plain.gguf", "f16", echo=lambda *a: None)
    for p in sorted(tmp_path.glob("plain*")):
        for f in ([p] if p.is_file() else sorted(p.iterdir())):
            plain[f.relative_to(tmp_path).as_posix().replace("plain", "x", 1)] = f.read_bytes()

    copies = []  # the bytes each in-kernel copy moved
    real = os.copy_file_range
    monkeypatch.setattr(stream.HashingWriter, "_PARALLEL", 4096)
    monkeypatch.setattr(os, "copy_file_range", lambda src, dst, count, offset_src=None, offset_dst=None:
                        copies.append(count) or real(src, dst, count, offset_src, offset_dst))
    export.export_pth(inputs["merged_odd"], tmp_path / "copy", num_shards=n, echo=lambda *a: None)
    n_pth = len(copies)
    export.export_gguf(inputs["merged_odd"], tmp_path / "copy.gguf", "f16", echo=lambda *a: None)
    assert n_pth >= 10 and len(copies) - n_pth >= 10  # both sinks copied in the kernel
    assert min(copies) >= 4096  # runs under the threshold were written, not copied
    got = {}
    for p in sorted(tmp_path.glob("copy*")):
        for f in ([p] if p.is_file() else sorted(p.iterdir())):
            got[f.relative_to(tmp_path).as_posix().replace("copy", "x", 1)] = f.read_bytes()
    assert got.keys() == plain.keys()
    for k in plain:
        if k.endswith(".sha256"):  # '<hash>  copy.gguf' vs '<hash>  plain.gguf'
            assert got[k].split()[0] == plain[k].split()[0]
        else:
            assert got[k] == plain[k], k


def test_pth_shards_must_divide(inputs, tmp_path):
    from llamaforge.export.pth import export_pth

    out = tmp_path / "pth"
    with pytest.raises(LlamaforgeError, match="does not divide into 3 shards") as e:
        export_pth(inputs["merged"], out, num_shards=3, echo=lambda *a: None)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# GGUF


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = f.contents()
    return out


def _hf_to_gguf_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _expected_gguf(model: Path) -> dict[str, torch.Tensor]:
    cfg = hf_config(model)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for k, w in hf_tensors(model).items():
        if k in _GGUF_NAMES:
            out[_GGUF_NAMES[k]] = w
            continue
        _, _, i, rest = k.split(".", 3)
        mod = rest.removesuffix(".weight")
        if mod == "self_attn.q_proj":
            w = _hf_to_gguf_order(w, heads)
        elif mod == "self_attn.k_proj":
            w = _hf_to_gguf_order(w, kv)
        out[f"blk.{i}.{_GGUF_LAYER[mod]}.weight"] = w
    return out


@pytest.mark.parametrize("case", ["merged", "gqa"])
def test_gguf_f16_metadata_and_tensors(inputs, tmp_path, case):
    import gguf

    from llamaforge.export.gguf import export_gguf
    from llamaforge.tokenizer import load_proto

    model = inputs[case]
    out = tmp_path / f"{case}-f16.gguf"
    digest = export_gguf(model, out, "f16", echo=lambda *a: None)
    assert (tmp_path / f"{case}-f16.gguf.sha256").read_text() == f"{digest}  {out.name}\n"
    sha256sum_check(tmp_path, f"{out.name}.sha256")

    r = gguf.GGUFReader(out)
    f = _fields(r)
    cfg = hf_config(model)
    assert f["general.architecture"] == "llama" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f["llama.vocab_size"] == cfg["vocab_size"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    assert f["llama.rope.freq_base"] == pytest.approx(theta)

    proto = load_proto(model / "tokenizer.model")
    n = len(proto.pieces)
    assert f["tokenizer.ggml.model"] == "llama"
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == cfg["vocab_size"]
    assert tokens[:n] == [p.piece for p in proto.pieces]
    assert scores[:n] == pytest.approx([p.score for p in proto.pieces])
    assert types[:n] == [int(p.type) for p in proto.pieces]
    assert types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL  # <0x00>, <s>
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    if case == "merged":  # Chinese-Alpaca style: [PAD] is the padding token
        assert tokens[-1] == "[PAD]" and f["tokenizer.ggml.padding_token_id"] == cfg["vocab_size"] - 1
    else:  # 515 embedding rows, 512 pieces: padded as convert_hf_to_gguf.py does
        assert tokens[n:] == [f"[PAD{i}]" for i in range(n, cfg["vocab_size"])]
        assert set(types[n:]) == {gguf.TokenType.UNUSED}

    want = _expected_gguf(model)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(t.data, w.float().numpy()), name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert [int(x) for x in t.shape] == list(reversed(w.shape)), name
            assert np.array_equal(t.data.view(np.uint16), w.to(torch.float16).numpy().view(np.uint16)), name


def test_gguf_q8_0_blocks_equal_gguf_quantize(inputs, tmp_path):
    import gguf

    from llamaforge.export.gguf import export_gguf

    model = inputs["merged"]
    out = tmp_path / "m-q8_0.gguf"
    export_gguf(model, out, "q8_0", echo=lambda *a: None)
    r = gguf.GGUFReader(out)
    assert _fields(r)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    got = {t.name: t for t in r.tensors}
    Q = gguf.GGMLQuantizationType
    seen = set()
    for name, w in _expected_gguf(model).items():
        t = got[name]
        seen.add(t.tensor_type)
        if w.dim() == 1:
            assert t.tensor_type == Q.F32
        elif w.shape[-1] % 32:  # rows not a multiple of 32: llama.cpp falls back to F16
            assert t.tensor_type == Q.F16, name
            assert np.array_equal(t.data.view(np.uint16), w.to(torch.float16).numpy().view(np.uint16))
        else:
            assert t.tensor_type == Q.Q8_0, name  # token_embd and output too, as llama.cpp does
            ref = gguf.quants.quantize(w.float().numpy(), Q.Q8_0)
            assert bytes(np.ascontiguousarray(t.data)) == ref.tobytes(), name
    assert seen == {Q.F32, Q.Q8_0}
    # rows of 200 (the GQA model's ffn_down) are not a multiple of 32: F16, as llama.cpp does
    out2 = tmp_path / "gqa-q8_0.gguf"
    export_gguf(inputs["gqa"], out2, "q8_0", echo=lambda *a: None)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out2).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0


def test_gguf_bf16(inputs, tmp_path):
    import gguf

    from llamaforge.export.gguf import export_gguf

    model = inputs["gqa"]
    out = tmp_path / "g-bf16.gguf"
    export_gguf(model, out, "bf16", echo=lambda *a: None)
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, w in _expected_gguf(model).items():
        if w.dim() > 1:
            ref = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.BF16)
            assert got[name].tensor_type == gguf.GGMLQuantizationType.BF16
            assert bytes(np.ascontiguousarray(got[name].data)) == ref.tobytes(), name


@pytest.mark.parametrize("n", [1, 2])
def test_tied_embeddings(inputs, tmp_path, n):
    """tie_word_embeddings: save_pretrained stores no lm_head.weight. Meta's format has no tying, so
    the .pth holds output.weight = the embedding; the GGUF holds no output.weight, and llama.cpp then
    uses token_embd for the output (as for convert_hf_to_gguf.py's files of tied models)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.pth import export_pth

    model = inputs["tied"]
    want = hf_tensors(model)
    assert hf_config(model)["tie_word_embeddings"] is True and "lm_head.weight" not in want
    export_pth(model, tmp_path / "pth", num_shards=n, echo=lambda *a: None)
    sha256sum_check(tmp_path / "pth", "SHA256SUMS")
    got = meta_state_dict(tmp_path / "pth")
    assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])
    assert set(got) == set(want) | {"lm_head.weight"}
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # an untied model built from the .pth alone (its own output.weight) gives the tied model's logits
    cfg = LlamaConfig.from_pretrained(model)
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = untied.load_state_dict({k: v.float() for k, v in got.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = torch.arange(1, 40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(untied(ids).logits, logits(model))

    out = tmp_path / "tied-f16.gguf"
    export_gguf(model, out, "f16", echo=lambda *a: None)
    sha256sum_check(tmp_path, f"{out.name}.sha256")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in tensors and set(tensors) == set(_expected_gguf(model))
    for name, w in _expected_gguf(model).items():
        data = tensors[name].data
        ref = w.float().numpy() if w.dim() == 1 else w.to(torch.float16).numpy()
        assert np.array_equal(data.view(ref.dtype), ref), name


# ---------------------------------------------------------------------------------------------
# verification and bad inputs


def test_verify_sha256(inputs, tmp_path):
    from llamaforge.files.checksums import verify_sha256
    from llamaforge.export.pth import export_pth

    out = tmp_path / "exports" / "pth"
    hashes = export_pth(inputs["merged"], out, echo=lambda *a: None)
    good = {"exports/pth/consolidated.00.pth": hashes["consolidated.00.pth"]}
    lines = verify_sha256(good, [out / "SHA256SUMS"], root=tmp_path, echo=lambda *a: None)
    assert len(lines) == 4 and all(line.startswith("OK") for line in lines)

    wrong = "0" * 64
    with pytest.raises(LlamaforgeError) as e:
        verify_sha256({"exports/pth/params.json": wrong}, root=tmp_path, echo=lambda *a: None)
    msg = str(e.value)
    assert "exports/pth/params.json" in msg and wrong in msg and hashes["params.json"] in msg and "\n" not in msg
    with pytest.raises(LlamaforgeError, match="does not exist"):
        verify_sha256({"exports/pth/nope.pth": wrong}, root=tmp_path, echo=lambda *a: None)
    # a damaged file is caught through SHA256SUMS too
    (out / "params.json").write_text("{}\n")
    with pytest.raises(LlamaforgeError, match="params.json: sha256 is"):
        verify_sha256({}, [out / "SHA256SUMS"], echo=lambda *a: None)


def _script(name, *args, cwd=None):
    return run_script(name, *args, cwd=cwd)


def test_verify_script_fails_loudly(inputs, tmp_path):
    from llamaforge.export.pth import export_pth

    out = tmp_path / "exports" / "pth"
    hashes = export_pth(inputs["merged"], out, echo=lambda *a: None)
    report = tmp_path / "verify" / "m"
    r = _script("verify_sha256.py", "--expect", f"exports/pth/consolidated.00.pth={'1' * 64}",
                "--sums", "exports/pth/SHA256SUMS", "--output", report, cwd=tmp_path)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert len(err) == 1 and "exports/pth/consolidated.00.pth" in err[0] and hashes["consolidated.00.pth"] in err[0]
    assert not report.exists()
    r = _script("verify_sha256.py", "--expect", f"exports/pth/consolidated.00.pth={hashes['consolidated.00.pth']}",
                "--sums", "exports/pth/SHA256SUMS", "--output", report, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert report.read_text().count("OK") == 4


def test_model_without_tokenizer_model(inputs, tmp_path):
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.pth import export_pth

    model = tmp_path / "model"
    shutil.copytree(inputs["merged"], model)
    (model / "tokenizer.model").unlink()
    for call in (lambda: export_pth(model, tmp_path / "pth", echo=lambda *a: None),
                 lambda: export_gguf(model, tmp_path / "m.gguf", echo=lambda *a: None)):
        with pytest.raises(LlamaforgeError, match="no tokenizer.model") as e:
            call()
        assert "\n" not in str(e.value) and str(model) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no temporary left


def test_export_script_one_line_error(tmp_path):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out.gguf"
    r = _script("export_gguf.py", "--model", tmp_path / "model", "--output", out, "--outtype", "q8_0")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("llamaforge: error:") and "config.json" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_mismatched_config_is_refused(inputs, tmp_path):
    from llamaforge.export.pth import export_pth

    model = tmp_path / "model"
    shutil.copytree(inputs["merged"], model)
    cfg = hf_config(model)
    cfg["vocab_size"] = 1000
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamaforgeError, match="model.embed_tokens.weight has shape"):
        export_pth(model, tmp_path / "pth", echo=lambda *a: None)
    assert not (tmp_path / "pth").exists()


@pytest.mark.slow
def test_export_memory_stays_flat_as_the_model_grows(tmp_path):
    """Peak RSS of the exports is bounded by the largest tensor (a 32000-row embedding), not the model:
    8x the layers, about the same memory. Measured for two .pth shards (each row block of the
    embedding read once, its columns fed to both files) and GGUF BF16 (conversion blocks). (Q8_0
    quantizes in two threads: its peak varies by tens of MB from run to run, too much for this bound.)"""
    peaks = []
    for layers in (2, 16):
        work = tmp_path / f"L{layers}"
        synthesize(work, 32000, 32000, 8, hidden=1024, intermediate=2816, layers=layers, heads=8, kv_heads=8)
        model = work / "base"
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        rss = []
        for script, args in (("export_pth.py", ["--output", work / "pth", "--num-shards", 2]),
                             ("export_gguf.py", ["--output", work / "m.gguf", "--outtype", "bf16"])):
            rss.append(peak_rss([sys.executable, ROOT / "scripts" / script, "--model", model, *args]))
        peaks.append((size, rss))
    (small, rss_small), (large, rss_large) = peaks
    # both exports hold tensors in torch (the pth sink, the BF16 conversion): torch is part of the floor
    floor = baseline_rss("click", "gguf", "torch", "llamaforge.cli", "llamaforge.export")
    assert large > 2.5 * small
    for a, b in zip(rss_small, rss_large):
        assert b - a < 0.1 * (large - small), peaks
        # above the interpreter with the same imports: well under the model itself
        assert b - floor < 0.5 * large, (peaks, floor)


def test_vocabulary_padding_is_at_most_128_rows(demo, caplog):
    """Up to 128 embedding rows beyond the tokenizer's pieces are padding (a warning, [PAD{id}] in
    GGUF); more is a mismatch that names both counts and the LLaMA/Chinese vocabulary sizes."""
    import logging

    from llamaforge.export.source import check_vocab_padding

    tok = demo / "base" / "tokenizer.model"  # 512 pieces
    assert check_vocab_padding(tok, 512) == 512
    with caplog.at_level(logging.WARNING, logger="llamaforge.export"):
        assert check_vocab_padding(tok, 640) == 512
    assert "512 pieces for 640 embedding rows" in caplog.text
    with pytest.raises(LlamaforgeError, match=r"512 pieces but the model has 641 embedding rows \(129 more.*32000.*"
                                              r"49953.*49954"):
        check_vocab_padding(tok, 641)
    with pytest.raises(LlamaforgeError, match="512 pieces but the model has only 511 embedding rows"):
        check_vocab_padding(tok, 511)


def test_a_family_value_offset_is_applied_on_export(inputs, tmp_path, monkeypatch):
    """A tensor entry's `offset` (Gemma's norms are stored as w - 1) reaches the GGUF: each value
    plus the offset, in the stored dtype; the family entry is the only change."""
    import dataclasses

    from llamaforge.export.gguf import export_gguf
    from llamaforge.model import families

    plain = tmp_path / "plain.gguf"
    export_gguf(inputs["merged"], plain, "f16", echo=lambda *a: None, modelfile=None)
    llama = families.FAMILIES["llama"]
    layer = tuple(dataclasses.replace(t, offset=1.0) if t.norm else t for t in llama.layer)
    monkeypatch.setitem(families.FAMILIES, "llama", dataclasses.replace(llama, layer=layer))
    out = tmp_path / "m.gguf"
    export_gguf(inputs["merged"], out, "f16", echo=lambda *a: None, modelfile=None)
    from gguf import GGUFReader

    got = {t.name: t for t in GGUFReader(out).tensors}
    src = hf_tensors(inputs["merged"])
    norm = src["model.layers.0.input_layernorm.weight"]
    assert torch.equal(torch.from_numpy(got["blk.0.attn_norm.weight"].data.copy()), (norm + 1.0).float())
    assert torch.equal(torch.from_numpy(got["output_norm.weight"].data.copy()), src["model.norm.weight"].float())
    # every other tensor as without the offsets
    before = {t.name: t for t in GGUFReader(plain).tensors}
    assert all(np.array_equal(got[n].data, before[n].data) for n in got if not n.endswith("attn_norm.weight")
               and not n.endswith("ffn_norm.weight"))


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_export_of_a_float16_model_needs_no_torch(inputs, tmp_path, monkeypatch, outtype):
    """An F16 or Q8_0 GGUF of a float16 model moves bytes (q/k rows permuted as unsigned integers,
    norms widened to float32, Q8_0 by gguf-py from float32): no torch is imported, and the file is
    the one torch's path writes, byte for byte (a GQA model: k has fewer heads than q)."""
    from llamaforge.export import gguf as gguf_export

    model = inputs["gqa"]
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_gguf.py"
    probe = ("import atexit, runpy, sys; sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0]); "
             "atexit.register(lambda: print('MODULES', sorted(m for m in ('torch', 'transformers') if m in sys.modules)));"
             " script = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")
    raw = tmp_path / "raw.gguf"
    done = subprocess.run([sys.executable, "-c", probe, str(script), "--model", str(model), "--outtype", outtype,
                           "--output", str(raw)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODULES []" in done.stdout.splitlines()
    monkeypatch.setattr(gguf_export, "_raw_stream", lambda gguf, plan: False)
    via_torch = tmp_path / "torch.gguf"
    gguf_export.export_gguf(model, via_torch, outtype, echo=lambda *a: None)
    assert raw.read_bytes() == via_torch.read_bytes()


def test_gguf_export_of_a_pickle_model_takes_the_raw_stream_too(inputs, tmp_path, monkeypatch):
    """A float16 model stored as pytorch_model.bin goes through the raw (numpy) stream as well: the
    pickle reader fills numpy buffers like the safetensors one, and the GGUF is torch's, byte for byte."""
    from safetensors.torch import load_file

    from llamaforge.export import gguf as gguf_export

    model = tmp_path / "bin"
    shutil.copytree(inputs["gqa"], model, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {}
    for f in sorted(inputs["gqa"].glob("*.safetensors")):
        state.update(load_file(f))
    torch.save(state, model / "pytorch_model.bin")
    used = []
    real = gguf_export._raw_stream
    monkeypatch.setattr(gguf_export, "_raw_stream", lambda gguf, plan: used.append(real(gguf, plan)) or used[-1])
    raw = tmp_path / "raw.gguf"
    gguf_export.export_gguf(model, raw, "q8_0", echo=lambda *a: None)
    assert used == [True]
    monkeypatch.setattr(gguf_export, "_raw_stream", lambda gguf, plan: False)
    via_torch = tmp_path / "torch.gguf"
    gguf_export.export_gguf(model, via_torch, "q8_0", echo=lambda *a: None)
    assert raw.read_bytes() == via_torch.read_bytes()
