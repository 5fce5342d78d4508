"""Bad input, as a careless user or an adversary gives it: every row runs one command as a user
would (a subprocess) and asserts exit status 1, exactly one `llamaforge: error:` line that names
what is wrong, no traceback, and every file of the test's world byte-identical afterwards (the
whole tree is hashed before and after: nothing created, changed or removed)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import run_script
from llamaforge.defaults import CRAWL_ITEMS_PER_REQUEST

# --- the world: a user's folders, and llamaforge's own outputs beside them ---------------------


@pytest.fixture(scope="module")
def world(demo, tmp_path_factory) -> Path:
    from llamaforge.export.gguf import export_gguf
    from llamaforge.export.pth import export_pth
    from llamaforge.merge.run import merge_lora

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(demo / "base", w / "base")
    shutil.copytree(demo / "lora_llama_plus", w / "lora")
    shutil.copytree(demo / "sp", w / "sp")
    quiet = dict(echo=lambda *a: None)
    merge_lora(w / "base", [w / "lora"], w / "merged", progress=False, **quiet)
    export_gguf(w / "merged", w / "out" / "m-f16.gguf", "f16", **quiet)
    export_pth(w / "merged", w / "pth", **quiet)
    (w / "thesis").mkdir()
    (w / "thesis" / "chapter1.txt").write_text("Five years of work.\n")
    (w / "thesis" / "notes.json").write_text('{"draft": 3}\n')
    (w / "thesis" / "data.jsonl").write_text('{"id": 1, "text": "my own data"}\n{"id": 2, "text": "partial')
    (w / "thesis" / "model.safetensors").write_bytes((w / "base" / "model-00001-of-00002.safetensors").read_bytes())
    (w / "cases").mkdir()
    return w


def tree(root: Path) -> dict[str, str]:
    """Every file (and folder) under root: sha256 of files, 'dir' for folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- helpers that make one broken input from a sound one ---------------------------------------


def edit_safetensors(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with edit(header) (its data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + n:])


def base_with(case: Path, world: Path, edit) -> Path:
    """A copy of the base whose first shard's header is edited."""
    base = case / "base"
    shutil.copytree(world / "base", base)
    edit_safetensors(base / "model-00001-of-00002.safetensors", edit)
    return base


def _two_tensors(header):
    """Two tensors of the same shape (the first two in the file that share one)."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    for k in names:
        same = [n for n in names if header[n]["shape"] == header[k]["shape"]]
        if len(same) > 1:
            return header[same[0]], header[same[1]]
    raise AssertionError("no two tensors share a shape")


def overlap(header):
    a, b = _two_tensors(header)
    b["data_offsets"] = list(a["data_offsets"])


def unknown_dtype(header):
    a, _ = _two_tensors(header)
    a["dtype"] = "F4"


def negative_shape(header):
    a, _ = _two_tensors(header)
    a["shape"] = [-a["shape"][0]] + a["shape"][1:]


def gap(header):
    # every tensor moved 8 bytes on: a gap before the first, the last runs past the end
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]


def adapter_with(case: Path, world: Path, **changes) -> Path:
    """A copy of the adapter whose adapter_config.json has `changes` (raw JSON text per value)."""
    lora = case / "lora"
    shutil.copytree(world / "lora", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    text = json.dumps({k: v for k, v in cfg.items() if k not in changes})[:-1]
    text += "".join(f', "{k}": {v}' for k, v in changes.items()) + "}"
    (lora / "adapter_config.json").write_text(text)
    return lora


def folder_with(case: Path, src: Path, name: str, files: dict[str, bytes | str]) -> Path:
    d = case / name
    shutil.copytree(src, d)
    for f, content in files.items():
        (d / f).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def evil_bin_model(case: Path, world: Path) -> Path:
    """A model folder whose pytorch_model.bin runs a shell command when unpickled naively."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {case / 'PWNED'}",))

    d = case / "evil"
    d.mkdir()
    shutil.copy(world / "base" / "config.json", d / "config.json")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(world / "base" / f, d / f)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil()}, d / "pytorch_model.bin")
    return d


def meta_missing_shard(case: Path, world: Path) -> Path:
    from llamaforge.export.pth import export_pth

    d = case / "meta"
    export_pth(world / "merged", d, num_shards=2, echo=lambda *a: None)
    (d / "consolidated.01.pth").unlink()
    return d


def json_edit(case: Path, src: Path, name: str, file: str, **changes) -> Path:
    """A copy of folder `src` whose JSON `file` has `changes` (raw JSON text per value)."""
    d = case / name
    shutil.copytree(src, d)
    data = json.loads((d / file).read_text())
    text = json.dumps({k: v for k, v in data.items() if k not in changes})[:-1]
    (d / file).write_text(text + "".join(f', "{k}": {v}' for k, v in changes.items()) + "}")
    return d


def with_file(case: Path, name: str, content: bytes | str) -> Path:
    f = case / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return f


def dtype_list(header):
    a, _ = _two_tensors(header)
    a["dtype"] = [a["dtype"]]


def as_int16(header):
    a, _ = _two_tensors(header)
    a["dtype"] = "I16"


def base_with_duplicate_key(case: Path, world: Path) -> Path:
    base = case / "base"
    shutil.copytree(world / "base", base)
    f = base / "model-00001-of-00002.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[name])
    text = json.dumps(header)[:-1] + f', "{name}": {entry}' + "}"
    data = text.encode() + b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + n:])
    return base


def base_of_another_family(case: Path, world: Path) -> Path:
    base = case / "base"
    shutil.copytree(world / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def meta_with_garbled_tiktoken(case: Path, world: Path) -> Path:
    meta = case / "meta"
    shutil.copytree(world / "pth", meta)
    (meta / "tokenizer.model").write_text("IQ== 0\nIg== 1\nnot-base64!! x\n")
    return meta


DEEP = "[" * 100000 + "]" * 100000


def outside(name: str) -> Path:
    """A fresh folder outside the world, for what its hashing cannot read (a FIFO, a symlink loop)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"hostile-{name}-"))


def symlink_loop(name: str) -> Path:
    link = outside(name) / name
    link.symlink_to(link.name)  # points at itself
    return link


def fifo() -> Path:
    f = outside("fifo") / "f16.gguf"
    os.mkfifo(f)
    return f


def write_sidecar(path: Path) -> Path:
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    return path


def rewrite_gguf(src: Path, dst: Path, kv: dict | None = None, drop_kv=(), tensors: dict | None = None,
                 drop=(), sidecar: bool = True) -> Path:
    """A copy of GGUF `src` at `dst` with KV values replaced ({key: (value, GGUFValueType[, sub_type])}) or
    dropped, tensors replaced ({name: numpy array}) or dropped; with a matching .sha256 beside it."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_kv:
            continue
        if kv and name in kv:
            w.add_key_value(name, *kv[name])
        else:
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for key, value in (kv or {}).items():
        if key not in r.fields:
            w.add_key_value(key, *value)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, (tensors or {}).get(t.name, t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return write_sidecar(dst) if sidecar else dst


def f16_of_another_model(case: Path, world: Path) -> Path:
    """The world's F16 with another general.name and 512 token_embd/output rows and tokens."""
    import gguf

    src = world / "out" / "m-f16.gguf"
    r = gguf.GGUFReader(src)
    tok = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tok.parts[i]).decode() for i in tok.data][:512]
    scores = list(r.fields["tokenizer.ggml.scores"].contents())[:512]
    types = list(r.fields["tokenizer.ggml.token_type"].contents())[:512]
    T = gguf.GGUFValueType
    cut = {t.name: t.data[:512] for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}
    return rewrite_gguf(src, case / "other-f16.gguf", kv={
        "general.name": ("another model", T.STRING), "llama.vocab_size": (512, T.UINT32),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING), "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32)}, tensors=cut)


def f16_with_token(case: Path, world: Path, i: int, token: str) -> Path:
    import gguf

    src = world / "out" / "m-f16.gguf"
    tok = gguf.GGUFReader(src).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tok.parts[j]).decode() for j in tok.data]
    tokens[i] = token
    return rewrite_gguf(src, case / "f16.gguf", kv={
        "tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)})


def gguf_type(name: str):
    import gguf

    return gguf.GGUFValueType[name]


def f16_shape(case: Path, world: Path, name: str, rows: int) -> Path:
    import gguf

    src = world / "out" / "m-f16.gguf"
    data = next(t.data for t in gguf.GGUFReader(src).tensors if t.name == name)
    return rewrite_gguf(src, case / "f16.gguf", tensors={name: data[:rows]})


def f16_swapped(case: Path, world: Path) -> Path:
    """The world's F16 and its .sha256, then two runs of tensor data swapped (same size, structure intact)."""
    import gguf

    src = world / "out" / "m-f16.gguf"
    dst = case / "f16.gguf"
    raw = bytearray(src.read_bytes())
    dst.with_name("f16.gguf.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  f16.gguf\n")
    ts = [t for t in gguf.GGUFReader(src).tensors if t.name.endswith("attn_q.weight")][:2]
    a, b, n = int(ts[0].data_offset), int(ts[1].data_offset), int(ts[0].n_bytes)
    assert raw[a:a + n] != raw[b:b + n]
    raw[a:a + n], raw[b:b + n] = raw[b:b + n], raw[a:a + n]
    dst.write_bytes(bytes(raw))
    return dst


def gguf_bad_template(case: Path, world: Path, how: str, sidecar: bool = True) -> Path:
    """The world's F16 whose tokenizer.chat_template is no string ('int') or not UTF-8 ('bytes')."""
    import gguf

    src = world / "out" / "m-f16.gguf"
    T = gguf.GGUFValueType
    if how == "int":
        return rewrite_gguf(src, case / "f16.gguf", kv={"tokenizer.chat_template": (7, T.UINT32)}, sidecar=sidecar)
    dst = rewrite_gguf(src, case / "f16.gguf", kv={"tokenizer.chat_template": ("\u00e9MARKMARK", T.STRING)},
                       sidecar=False)
    raw = dst.read_bytes()
    assert raw.count("\u00e9MARKMARK".encode()) == 1
    dst.write_bytes(raw.replace("\u00e9MARKMARK".encode(), b"\xff\xfeMARKMARK"))
    return write_sidecar(dst) if sidecar else dst


def truncated(case: Path, world: Path) -> Path:
    raw = (world / "out" / "m-f16.gguf").read_bytes()
    return with_file(case, "t.gguf", raw[:len(raw) * 2 // 3])


def tok_with(case: Path, world: Path, edit) -> Path:
    """A tokenizer folder: the merged model's tokenizer files, edit(folder) applied."""
    from llamaforge.tokenizer import tokenizer_files

    d = case / "tok"
    d.mkdir()
    for f in tokenizer_files(world / "merged"):
        shutil.copy(f, d / f.name)
    edit(d)
    return d


def edit_json(file: str, fn):
    def edit(d: Path):
        data = json.loads((d / file).read_text())
        fn(data)
        (d / file).write_text(json.dumps(data))
    return edit


def model_with_tok(case: Path, world: Path, edit) -> Path:
    """A copy of the merged model folder with its tokenizer files edited."""
    d = case / "m"
    shutil.copytree(world / "merged", d)
    edit(d)
    return d


def _bad_merges(tj):
    tj["model"]["merges"] = ["\u00e4\u00e4\u00e4 nosuchtoken"] + list(tj["model"]["merges"])


def _list_vocab(tj):
    tj["model"]["vocab"] = [[k, 0.0] for k in tj["model"]["vocab"]]


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _add_decoder(key, value):
    return lambda d: d.setdefault("added_tokens_decoder", {}).__setitem__(key, value)


def _tok_cfg(fn):
    return edit_json("tokenizer_config.json", fn)


NO_DEFAULT = [{"name": "chat", "template": "{{ messages }}"}, {"name": "tool_use", "template": "{{ tools }}"}]
BROKEN_TOKENIZERS = [  # (id, edit of a tokenizer folder, fragment)
    ("bad-merges", edit_json("tokenizer.json", _bad_merges), "tokenizer.json cannot be loaded by the tokenizers"),
    ("list-vocab", edit_json("tokenizer.json", _list_vocab), "tokenizer.json cannot be loaded by the tokenizers"),
    ("post-processor-string", edit_json("tokenizer.json", _set("post_processor", "TemplateProcessing")),
     "tokenizer.json cannot be loaded by the tokenizers"),
    ("added-token-past-the-rows", _tok_cfg(_add_decoder("5000", {"content": "<x>", "special": True})),
     "5001 tokens"),
    ("decoder-key-no-id", _tok_cfg(_add_decoder("five", {"content": "<x>"})),
     "added_tokens_decoder has the key 'five', which is no token id"),
    ("decoder-value-no-object", _tok_cfg(_add_decoder("3", "<x>")), "added_tokens_decoder[3] is \"<x>\", not a token"),
    ("chat-template-list-of-strings", _tok_cfg(_set("chat_template", ["{{ a }}", "{{ b }}"])),
     "chat_template entry 0 is \"{{ a }}\""),
    ("chat-template-list-without-default", _tok_cfg(_set("chat_template", NO_DEFAULT)),
     "chat_template lists templates named chat, tool_use but none named 'default'"),
    ("chat-template-number", _tok_cfg(_set("chat_template", 3)), "chat_template is a JSON int"),
]


def quantize_args(w: Path, c: Path, f16: Path) -> list:
    return ["export_gguf.py", "--model", w / "merged", "--output", c / "q.gguf", "--outtype", "q4_k_m",
            "--from-f16", f16]


def modelfile_args(w: Path, c: Path, parameter: str) -> list:
    return ["modelfile.py", "--gguf", w / "out" / "m-f16.gguf", "--output", c / "m.Modelfile",
            "--parameter", parameter]


def quality_args(w: Path, c: Path, gguf: Path) -> list:
    return ["evaluate.py", "gguf-quality", "--model", w / "merged", "--gguf", gguf, "--output", c / "q.json"]


def meta_with_user_file(case: Path, world: Path) -> Path:
    """A Meta export of llamaforge's (SHA256SUMS with its header) into which the user put a file of theirs."""
    d = case / "pth"
    shutil.copytree(world / "pth", d)
    (d / "my-notes.txt").write_text("kept here on purpose\n")
    return d


RAW_RECORD = json.dumps({"index": 0, "seed": 0, "items_per_request": CRAWL_ITEMS_PER_REQUEST, "attempts": 1, "finish_reason": "stop",
                         "usage": None, "counts": {"parsed": 1, "accepted": 1}, "content": "[]"}) + "\n"
BAD_REFERENCE = {"llamaforge": "gguf_quality", "model": "merged/m", "reference": [1], "exports": [
    {"outtype": "q8_0", "bits_per_weight": 8.5, "perplexity": 10, "kl_mean": 0.01}]}


def crawl_store(case: Path, raw: str, items: str | None = None) -> Path:
    """A crawl's store (`NAME.raw.jsonl`, and `NAME.jsonl` when items are given) as a crawl leaves it."""
    with_file(case, "c.raw.jsonl", raw)
    if items is not None:
        with_file(case, "c.jsonl", items)
    return case / "c.jsonl"


def crawl_args(output: Path, *extra) -> list:
    return ["crawl_prompts.py", "--output", output, "--num-requests", "1", "--no-progress", "--max-retries", "0",
            "--base-url", "http://127.0.0.1:9/v1", *extra]


def nan_model(case: Path, world: Path) -> Path:
    """A copy of the merged model whose final norm is NaN (a NaN adapter, a float16 overflow)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = case / "nan"
    shutil.copytree(world / "merged", d)
    f = next(p for p in sorted(d.glob("*.safetensors")) if "model.norm.weight" in safe_open(p, "pt").keys())
    with safe_open(f, "pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * float("nan")
    save_file(tensors, f, metadata=meta)
    return d


def modelfile_text_plus(extra: str) -> str:
    from llamaforge.export.modelfile import modelfile_text

    return modelfile_text("m-f16.gguf", None, {}) + extra


def merge_args(base, loras, output, *extra):
    return ["merge_lora.py", "--base", base, *[a for lo in loras for a in ("--lora", lo)], "--output", output,
            "--no-progress", *extra]


# --- the table: (id, setup(world, case) -> command, fragments the error line must hold) --------

CASES = [
    # outputs that would destroy an input or a user's folder
    ("merge-output-is-base", lambda w, c: merge_args(w / "base", [w / "lora"], w / "base"),
     ["the output is the base model folder"]),
    ("merge-output-is-adapter", lambda w, c: merge_args(w / "base", [w / "lora"], w / "lora"),
     ["the output is the adapter folder"]),
    ("merge-output-holds-both", lambda w, c: merge_args(w / "base", [w / "lora"], w),
     ["the output holds the base model folder"]),
    ("merge-output-inside-base", lambda w, c: merge_args(w / "base", [w / "lora"], w / "base" / "merged"),
     ["the output lies inside the base model folder"]),
    ("merge-output-unrelated-folder", lambda w, c: merge_args(w / "base", [w / "lora"], w / "thesis"),
     ["not a merged model folder that llamaforge wrote"]),
    ("merge-output-is-an-export", lambda w, c: merge_args(w / "base", [w / "lora"], w / "pth"),
     ["not a merged model folder that llamaforge wrote"]),
    ("pth-into-model-folder", lambda w, c: ["export_pth.py", "--model", w / "merged", "--output", w / "merged"],
     ["the output is the model folder"]),
    ("pth-inside-model-folder", lambda w, c: ["export_pth.py", "--model", w / "merged", "--output", w / "merged" / "pth"],
     ["the output lies inside the model folder"]),
    ("pth-over-unrelated-folder", lambda w, c: ["export_pth.py", "--model", w / "merged", "--output", w / "thesis"],
     ["not a Meta export folder that llamaforge wrote"]),
    ("gguf-over-weight-file", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                            w / "merged" / "model.safetensors"],
     ["the output lies inside the model folder"]),
    ("gguf-over-foreign-file", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                             w / "thesis" / "model.safetensors"],
     ["not a GGUF file that llamaforge wrote"]),
    ("tokenizer-into-input-folder", lambda w, c: ["merge_tokenizers.py", "--base", w / "sp" / "base.model", "--extra",
                                                  w / "sp" / "chinese.model", "--output", w / "sp"],
     ["the output holds the base SentencePiece model"]),
    ("import-into-meta-folder", lambda w, c: ["import_pth.py", "--input", w / "pth", "--output", w / "pth"],
     ["the output is the Meta model folder"]),
    ("predictions-over-user-file", lambda w, c: ["inference.py", "--model", w / "merged", "--predictions-file",
                                                 w / "thesis" / "notes.json"],
     ["not a predictions file that llamaforge wrote"]),
    ("predictions-inside-model", lambda w, c: ["inference.py", "--model", w / "merged", "--predictions-file",
                                               w / "merged" / "p.json"],
     ["lies inside the model folder"]),
    ("perplexity-over-user-json", lambda w, c: ["evaluate.py", "perplexity", "--model", w / "merged", "--output",
                                                w / "thesis" / "notes.json"],
     ["not a llamaforge JSON file that llamaforge wrote"]),
    ("crawl-over-user-jsonl", lambda w, c: ["crawl_prompts.py", "--output", w / "thesis" / "data.jsonl",
                                            "--num-requests", "1", "--base-url", "http://127.0.0.1:9/v1"],
     ["not a crawl items file that llamaforge wrote"]),
    ("verify-report-over-user-file", lambda w, c: ["verify_sha256.py", "--sums", w / "pth" / "SHA256SUMS",
                                                   "--output", w / "thesis" / "chapter1.txt"],
     ["not a checksum report that llamaforge wrote"]),
    # inputs that would give a silently wrong result
    ("safetensors-overlap", lambda w, c: merge_args(base_with(c, w, overlap), [w / "lora"], c / "out"),
     ["overlap"]),
    ("safetensors-unknown-dtype", lambda w, c: merge_args(base_with(c, w, unknown_dtype), [w / "lora"], c / "out"),
     ["has dtype 'F4', which llamaforge cannot read"]),
    ("safetensors-negative-shape", lambda w, c: merge_args(base_with(c, w, negative_shape), [w / "lora"], c / "out"),
     ["negative dimension"]),
    ("safetensors-gap", lambda w, c: merge_args(base_with(c, w, gap), [w / "lora"], c / "out"),
     ["a gap of 8 bytes"]),
    ("lora-alpha-nan", lambda w, c: merge_args(w / "base", [adapter_with(c, w, lora_alpha="NaN")], c / "out"),
     ["lora_alpha is NaN, not a finite number"]),
    ("lora-alpha-inf", lambda w, c: merge_args(w / "base", [adapter_with(c, w, lora_alpha="Infinity")], c / "out"),
     ["lora_alpha is Infinity, not a finite number"]),
    ("lora-r-string", lambda w, c: merge_args(w / "base", [adapter_with(c, w, r='"8"')], c / "out"),
     ['r is "8", not a finite number']),
    ("lora-r-null", lambda w, c: merge_args(w / "base", [adapter_with(c, w, r="null")], c / "out"),
     ["r is null, not a finite number"]),
    ("lora-alpha-list", lambda w, c: merge_args(w / "base", [adapter_with(c, w, lora_alpha="[32]")], c / "out"),
     ["lora_alpha is [32], not a finite number"]),
    ("adapter-config-list", lambda w, c: merge_args(
        w / "base", [folder_with(c, w / "lora", "lora", {"adapter_config.json": "[1, 2]"})], c / "out"),
     ["adapter_config.json holds a JSON list"]),
    ("config-json-list", lambda w, c: merge_args(
        folder_with(c, w / "base", "base", {"config.json": "[]"}), [w / "lora"], c / "out"),
     ["config.json holds a JSON list, not an object"]),
    ("same-adapter-twice", lambda w, c: merge_args(w / "base", [w / "lora", w / "lora"], c / "out"),
     ["the same adapter is listed twice"]),
    ("corrupt-tokenizer-json", lambda w, c: merge_args(
        w / "base", [w / "lora"], c / "out", "--tokenizer",
        folder_with(c, w / "lora", "tok", {"tokenizer.json": '{"version": "1.0", "model": '})),
     ["tokenizer.json is not valid JSON"]),
    ("corrupt-special-tokens-map", lambda w, c: merge_args(
        w / "base", [w / "lora"], c / "out", "--tokenizer",
        folder_with(c, w / "lora", "tok", {"special_tokens_map.json": "<html>"})),
     ["special_tokens_map.json is not valid JSON"]),
    ("gguf-tokenizer-far-too-short", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf", "--model", folder_with(
        c, w / "merged", "m", {"tokenizer.model": (w / "sp" / "base.model").read_bytes()})],
     ["tokenizer.model has 512 pieces but the model has 1189 embedding rows", "32000", "49953", "49954"]),
    ("pth-tokenizer-far-too-short", lambda w, c: ["export_pth.py", "--output", c / "pth", "--model", folder_with(
        c, w / "merged", "m", {"tokenizer.model": (w / "sp" / "base.model").read_bytes()})],
     ["tokenizer.model has 512 pieces but the model has 1189 embedding rows"]),
    ("inference-malicious-bin", lambda w, c: ["inference.py", "--model", evil_bin_model(c, w), "--predictions-file",
                                              c / "p.json"],
     ["holds pickled objects that are not tensors", "will not run them"]),
    ("inference-missing-model", lambda w, c: ["inference.py", "--model", w / "no-such-model", "--predictions-file",
                                              c / "p.json"],
     ["model folder not found"]),
    ("duplicate-add-token", lambda w, c: ["merge_tokenizers.py", "--base", w / "sp" / "base.model", "--extra",
                                          w / "sp" / "chinese.model", "--add-token", "[PAD]", "--add-token", "[PAD]",
                                          "--output", c / "tok"],
     ["--add-token '[PAD]' is given twice"]),
    ("import-missing-shard", lambda w, c: ["import_pth.py", "--input", meta_missing_shard(c, w), "--output", c / "hf"],
     ["consolidated.01.pth is missing"]),
    # found by an adversarial review: each was a traceback, a hang or a silently wrong output
    ("adapter-config-nested-too-deeply", lambda w, c: merge_args(
        w / "base", [folder_with(c, w / "lora", "lora", {"adapter_config.json": DEEP})], c / "out"),
     ["adapter_config.json is not valid JSON (nested too deeply)"]),
    ("safetensors-dtype-not-a-name", lambda w, c: merge_args(base_with(c, w, dtype_list), [w / "lora"], c / "out"),
     ["not a dtype name"]),
    ("safetensors-duplicate-key", lambda w, c: merge_args(base_with_duplicate_key(c, w), [w / "lora"], c / "out"),
     ["appears twice"]),
    ("base-with-integer-weights", lambda w, c: merge_args(base_with(c, w, as_int16), [w / "lora"], c / "out"),
     ["is stored as int16, not as floating-point weights"]),
    ("use-rslora-string", lambda w, c: merge_args(w / "base", [adapter_with(c, w, use_rslora='"false"')], c / "out"),
     ['use_rslora is "false", not true or false']),
    ("lora-r-fraction", lambda w, c: merge_args(w / "base", [adapter_with(c, w, r="8.5")], c / "out"),
     ["r is 8.5; a LoRA rank is a whole number"]),
    ("output-folder-is-a-file", lambda w, c: merge_args(w / "base", [w / "lora"],
                                                        with_file(c, "f", "x") / "out"),
     ["is a file"]),
    ("gguf-output-folder-is-a-file", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                                   with_file(c, "f", "x") / "m.gguf"],
     ["is a file"]),
    ("export-zero-kv-heads", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf", "--model",
                                           json_edit(c, w / "merged", "m", "config.json", num_key_value_heads="0")],
     ["the key/value heads is 0; it must be a positive number"]),
    ("export-nan-norm-eps", lambda w, c: ["export_pth.py", "--output", c / "pth", "--model",
                                          json_edit(c, w / "merged", "m", "config.json", rms_norm_eps="NaN")],
     ["the norm epsilon is nan; it must be a positive finite number"]),
    ("export-rope-parameters-list", lambda w, c: ["export_pth.py", "--output", c / "pth", "--model",
                                                  json_edit(c, w / "merged", "m", "config.json", rope_parameters="[1]")],
     ["config.json lacks or garbles"]),
    ("export-huge-layer-count", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf", "--model", json_edit(
        c, w / "merged", "m", "config.json", num_hidden_layers=str(10**12))],
     ["the layer count is 1000000000000, more than any model has"]),
    ("import-zero-heads", lambda w, c: ["import_pth.py", "--output", c / "hf", "--input",
                                        json_edit(c, w / "pth", "meta", "params.json", n_heads="0")],
     ["params.json"]),
    ("import-random-bytes-checkpoint", lambda w, c: ["import_pth.py", "--output", c / "hf", "--input", folder_with(
        c, w / "pth", "meta", {"consolidated.00.pth": os.urandom(4096)})],
     ["cannot read the Meta checkpoint with torch.load(weights_only=True)"]),
    ("summary-of-a-list", lambda w, c: ["evaluate.py", "summary", "--model", "x", "--perplexity",
                                        with_file(c, "p.json", "[1, 2]"), "--output", c / "s.json"],
     ["not a perplexity result of llamaforge"]),
    ("summary-missing-keys", lambda w, c: ["evaluate.py", "summary", "--model", "x", "--equivalence",
                                           with_file(c, "e.json", '{"llamaforge": "equivalence"}'), "--output",
                                           c / "s.json"],
     ["not a equivalence result of llamaforge (no 'passed')"]),
    ("plot-of-a-bad-summary", lambda w, c: ["evaluate.py", "plot", "--summary",
                                            with_file(c, "s.json", '{"model": "x", "tokenizer": [1]}'),
                                            "--tokens-per-char", c / "t.png"],
     ["a summary file does not hold what the plots need"]),
    ("tokenizer-stats-garbage-model", lambda w, c: ["evaluate.py", "tokenizer-stats", "--tokenizer",
                                                    with_file(c, "g.model", os.urandom(300)), "--base-tokenizer",
                                                    w / "sp" / "base.model", "--output", c / "t.json"],
     ["not a SentencePiece model"]),
    ("verify-nothing-to-check", lambda w, c: ["verify_sha256.py", "--sums", with_file(c, "SHA256SUMS", ""),
                                              "--output", c / "report"],
     ["nothing to verify"]),
    ("usage-missing-option", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf"],
     ["Missing option '--model'", "export_gguf.py --help"]),
    ("usage-bad-value", lambda w, c: ["export_pth.py", "--model", w / "merged", "--output", c / "pth",
                                      "--num-shards", "0"],
     ["--num-shards: 0 is not in the range"]),
    ("crawl-alpaca-json-is-the-items-file", lambda w, c: ["crawl_prompts.py", "--output", c / "n.jsonl",
                                                         "--alpaca-json", c / "n.jsonl", "--num-requests", "1",
                                                         "--base-url", "http://127.0.0.1:9/v1"],
     ["--alpaca-json is one of the crawl's own files"]),
    # today's families
    ("merge-unsupported-architecture", lambda w, c: merge_args(base_of_another_family(c, w), [w / "lora"], c / "m"),
     ["architecture 'GPTNeoXForCausalLM'", "is not supported; supported: LlamaForCausalLM"]),
    ("gguf-unsupported-architecture", lambda w, c: ["export_gguf.py", "--model", base_of_another_family(c, w),
                                                    "--output", c / "m.gguf"],
     ["architecture 'GPTNeoXForCausalLM'"]),
    ("tokenizer-extra-into-tokenizer-json", lambda w, c: ["merge_tokenizers.py", "--base", w / "merged", "--extra",
                                                          w / "sp" / "chinese.model", "--output", c / "t"],
     ["cannot be merged into a tokenizer.json tokenizer"]),
    ("import-garbled-tiktoken-tokenizer", lambda w, c: ["import_pth.py", "--input", meta_with_garbled_tiktoken(c, w),
                                                        "--output", c / "hf"],
     ["line 3 is not 'base64 rank'"]),
    ("quantize-from-a-foreign-gguf", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                                   c / "q.gguf", "--outtype", "q4_k_m", "--from-f16",
                                                   with_file(c, "other.gguf", b"GGUF" + bytes(60))],
     ["not a GGUF file"]),
    ("modelfile-over-a-foreign-file", lambda w, c: ["modelfile.py", "--gguf", w / "merged" / "model.safetensors",
                                                    "--output", w / "thesis" / "model.safetensors"],
     ["not an Ollama Modelfile that llamaforge wrote"]),
    ("crawl-nan-price", lambda w, c: ["crawl_prompts.py", "--output", c / "n.jsonl", "--price-in", "nan",
                                      "--num-requests", "1", "--base-url", "http://127.0.0.1:9/v1"],
     ["prices must be 0 or more"]),
    # issue 20, 1: ownership by a mark only llamaforge writes, for that kind of output
    ("modelfile-over-notes-titled-llamaforge", lambda w, c: [
        "modelfile.py", "--gguf", w / "out" / "m-f16.gguf", "--output",
        with_file(c, "NOTES.md", "# llamaforge build notes\nthree weeks of findings\n")],
     ["not an Ollama Modelfile that llamaforge wrote"]),
    ("modelfile-over-a-meta-sha256sums", lambda w, c: ["modelfile.py", "--gguf", w / "out" / "m-f16.gguf",
                                                       "--output", w / "pth" / "SHA256SUMS"],
     ["not an Ollama Modelfile that llamaforge wrote"]),
    ("modelfile-over-a-modelfile-the-user-edited", lambda w, c: [
        "modelfile.py", "--gguf", w / "out" / "m-f16.gguf", "--output",
        with_file(c, "m.Modelfile", modelfile_text_plus("SYSTEM You are my assistant.\n"))],
     ["not an Ollama Modelfile that llamaforge wrote"]),
    ("verify-report-over-notes-titled-llamaforge", lambda w, c: [
        "verify_sha256.py", "--sums", w / "pth" / "SHA256SUMS", "--output",
        with_file(c, "report", "# llamaforge verify\nmy notes on the hashes\n")],
     ["not a checksum report that llamaforge wrote"]),
    ("gguf-sidecar-over-another-files-hash", lambda w, c: [
        "export_gguf.py", "--model", w / "merged", "--no-modelfile", "--output",
        with_file(c, "m.gguf.sha256", "0" * 64 + "  thesis.pdf\n").with_name("m.gguf")],
     ["m.gguf.sha256: the output exists and is not a checksum file that llamaforge wrote"]),
    ("predictions-over-users-alpaca-data", lambda w, c: [
        "inference.py", "--model", w / "merged", "--predictions-file",
        with_file(c, "data.json", '[{"instruction": "mine", "input": "", "output": "my answer"}]')],
     ["not a predictions file that llamaforge wrote"]),
    ("perplexity-over-json-with-a-llamaforge-key", lambda w, c: [
        "evaluate.py", "perplexity", "--model", w / "merged", "--output",
        with_file(c, "notes.json", '{"llamaforge": "my notes on llamaforge"}')],
     ["not a llamaforge JSON file that llamaforge wrote"]),
    ("pth-over-export-holding-a-users-file", lambda w, c: [
        "export_pth.py", "--model", w / "merged", "--output", meta_with_user_file(c, w)],
     ["not a Meta export folder that llamaforge wrote"]),
    ("crawl-items-over-users-instruction-data", lambda w, c: [
        "crawl_prompts.py", "--output", with_file(c, "data.jsonl", '{"instruction": "mine", "input": "", "output": "o"}\n'),
        "--num-requests", "1", "--base-url", "http://127.0.0.1:9/v1"],
     ["not a crawl items file that llamaforge wrote"]),
    ("crawl-alpaca-json-over-users-alpaca-data", lambda w, c: [
        "crawl_prompts.py", "--output", with_file(c, "data.json", '[{"instruction": "mine", "input": "", "output": "o"}]')
        .with_suffix(".jsonl"), "--num-requests", "1", "--base-url", "http://127.0.0.1:9/v1"],
     ["data.json: the output exists and is not an Alpaca JSON of this crawl's items that llamaforge wrote"]),
    # the second adversarial pass (crawler store, evaluation and report, Snakemake config)
    ("crawl-over-users-jsonl-without-a-line-end", lambda w, c: [
        "crawl_prompts.py", "--output", with_file(c, "mine.jsonl", '{"instruction": "A", "input": "", "output": "a"}'),
        "--num-requests", "0", "--no-progress", "--base-url", "http://127.0.0.1:9/v1"],
     ["not a crawl items file that llamaforge wrote"]),
    ("crawl-store-with-a-bad-line-and-a-torn-tail", lambda w, c: crawl_args(
        crawl_store(c, RAW_RECORD + "garbage\n" + RAW_RECORD[:20])), ["line 2 is not valid JSON"]),
    ("crawl-store-of-another-seed-with-a-torn-tail", lambda w, c: crawl_args(
        crawl_store(c, RAW_RECORD + RAW_RECORD[:20]), "--seed", "7"), ["this crawl was started with --seed 0"]),
    ("crawl-store-index-a-list", lambda w, c: crawl_args(crawl_store(c, RAW_RECORD.replace('"index": 0', '"index": [0]'))),
     ["line 1 is not a reply record of llamaforge's crawl (index must be a whole number"]),
    ("crawl-store-usage-not-counts", lambda w, c: crawl_args(crawl_store(c, RAW_RECORD.replace('"usage": null',
                                                                                              '"usage": [1]'))),
     ["usage must be null or an object of token counts"]),
    ("crawl-store-counts-empty", lambda w, c: crawl_args(crawl_store(c, RAW_RECORD.replace(
        '"counts": {"parsed": 1, "accepted": 1}', '"counts": {}'))), ["counts must be an object"]),
    ("crawl-store-content-a-number", lambda w, c: crawl_args(crawl_store(c, RAW_RECORD.replace(
        '"content": "[]"', '"content": 5'))), ["content must be a string"]),
    ("crawl-items-line-not-an-item", lambda w, c: crawl_args(crawl_store(
        c, RAW_RECORD, '{"instruction": "a", "input": "", "output": "b"}\n[1]\n')),
     ["line 2 is not an item of llamaforge's crawl"]),
    ("crawl-num-requests-beyond-any-crawl", lambda w, c: [
        "crawl_prompts.py", "--output", c / "big.jsonl", "--num-requests", "100000000000", "--no-progress",
        "--base-url", "http://127.0.0.1:9/v1"], ["--num-requests must be 0 to 1,000,000"]),
    ("equivalence-of-a-model-full-of-nan", lambda w, c: [
        "evaluate.py", "equivalence", "--merged", nan_model(c, w), "--base", w / "base", "--lora", w / "lora",
        "--device", "cpu", "--output", outside("eq") / "eq.json"], ["merge check FAILED: max |delta logit| nan"]),
    ("perplexity-of-a-model-full-of-nan", lambda w, c: [
        "evaluate.py", "perplexity", "--model", nan_model(c, w), "--device", "cpu", "--output", c / "p.json"],
     ["the model's logits are not finite"]),
    ("equivalence-tolerance-nan", lambda w, c: [
        "evaluate.py", "equivalence", "--merged", w / "merged", "--base", w / "base", "--lora", w / "lora",
        "--tolerance", "nan", "--output", c / "eq.json"], ["the equivalence tolerance is nan"]),
    ("inference-seed-minus-one", lambda w, c: ["inference.py", "--model", w / "merged", "--seed", "-1",
                                               "--predictions-file", c / "p.json"],
     ["seed is -1; a sampling seed is 0 to 4294967295"]),
    ("inference-temperature-nan", lambda w, c: ["inference.py", "--model", w / "merged", "--temperature", "nan",
                                                "--predictions-file", c / "p.json"], ["temperature is nan"]),
    ("demo-seed-past-any-generator", lambda w, c: ["make_demo.py", "--output", c / "demo", "--seed",
                                                   "99999999999999999999"], ["the demo seed is 99999999999999999999"]),
    ("gguf-plot-reference-not-an-object", lambda w, c: ["evaluate.py", "gguf-plot", "--output", c / "q.png", "--quality",
                                                        with_file(c, "q.json", json.dumps(BAD_REFERENCE))],
     ["a GGUF quality file does not hold what the plot needs (AttributeError"]),
    # 2: --from-f16 checked against its .sha256 and the model it claims to be, before llama.cpp sees it
    ("from-f16-of-another-model", lambda w, c: quantize_args(w, c, f16_of_another_model(c, w)),
     ["token_embd.weight has shape [512, ", "another model's"]),
    ("from-f16-failing-its-sha256", lambda w, c: quantize_args(w, c, f16_swapped(c, w)),
     ["does not match its f16.gguf.sha256", "changed or damaged"]),
    ("from-f16-without-its-sha256", lambda w, c: quantize_args(
        w, c, with_file(c, "f16.gguf", (w / "out" / "m-f16.gguf").read_bytes())),
     ["has no readable f16.gguf.sha256 beside it"]),
    ("from-f16-missing-a-tensor", lambda w, c: quantize_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", drop={"blk.1.ffn_down.weight"})),
     ["has no tensor blk.1.ffn_down.weight"]),
    ("from-f16-wrong-token-embd-shape", lambda w, c: quantize_args(w, c, f16_shape(c, w, "token_embd.weight", 1000)),
     ["token_embd.weight has shape [1000, "]),
    ("from-f16-without-tokens", lambda w, c: quantize_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", drop_kv={"tokenizer.ggml.tokens"})),
     ["has no vocabulary (tokenizer.ggml.tokens)"]),
    ("from-f16-of-another-vocabulary", lambda w, c: quantize_args(w, c, f16_with_token(c, w, 600, "\u4e0d\u662f")),
     ["token 600 is '\u4e0d\u662f'", "another model's vocabulary"]),
    # an F16 whose hyperparameters were edited and its .sha256 written again: llama.cpp copies the keys
    ("from-f16-head-count-edited", lambda w, c: quantize_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", kv={"llama.attention.head_count": (1, gguf_type("UINT32"))})),
     ["the F16 GGUF's llama.attention.head_count differs from the model's (1)"]),
    ("from-f16-rope-base-edited", lambda w, c: quantize_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", kv={"llama.rope.freq_base": (1.0, gguf_type("FLOAT32"))})),
     ["the F16 GGUF's llama.rope.freq_base differs from the model's"]),
    ("from-f16-extra-key", lambda w, c: quantize_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", kv={"llama.expert_count": (8, gguf_type("UINT32"))})),
     ["has the key llama.expert_count, which an F16 export of the model does not write"]),
    ("from-f16-dev-zero", lambda w, c: quantize_args(w, c, Path("/dev/zero")),
     ["/dev/zero: the F16 GGUF is a character device, not a regular file"]),
    ("from-f16-fifo", lambda w, c: quantize_args(w, c, fifo()), ["the F16 GGUF is a FIFO (named pipe)"]),
    ("from-f16-chat-template-not-utf8", lambda w, c: quantize_args(w, c, gguf_bad_template(c, w, "bytes")),
     ["tokenizer.chat_template is not UTF-8 text"]),
    ("from-f16-chat-template-a-number", lambda w, c: quantize_args(w, c, gguf_bad_template(c, w, "int")),
     ["tokenizer.chat_template is a uint32, not a string"]),
    # 3, 4: one tokenizer check, at the first command that reads the tokenizer
    *[(f"merge-tokenizer-{k}", (lambda e: lambda w, c: merge_args(
        w / "base", [w / "lora"], c / "out", "--tokenizer", tok_with(c, w, e)))(edit), [frag])
      for k, edit, frag in BROKEN_TOKENIZERS],
    *[(f"gguf-tokenizer-{k}", (lambda e: lambda w, c: [
        "export_gguf.py", "--model", model_with_tok(c, w, e), "--output", c / "m.gguf"])(edit), [frag])
      for k, edit, frag in BROKEN_TOKENIZERS],
    ("pth-tokenizer-bad-merges", lambda w, c: ["export_pth.py", "--model", model_with_tok(
        c, w, BROKEN_TOKENIZERS[0][1]), "--output", c / "pth"], [BROKEN_TOKENIZERS[0][2]]),
    ("inference-tokenizer-list-vocab", lambda w, c: ["inference.py", "--model", model_with_tok(
        c, w, BROKEN_TOKENIZERS[1][1]), "--predictions-file", c / "p.json"], [BROKEN_TOKENIZERS[1][2]]),
    # 5: the Modelfile's FROM line and parameters
    ("modelfile-gguf-name-adds-lines", lambda w, c: [
        "modelfile.py", "--gguf", with_file(c, "evil\nSYSTEM pwned\nFROM x.gguf", b"GGUF"), "--output",
        c / "m.Modelfile"], ["the GGUF file name holds the character '\\n'", "FROM line cannot carry"]),
    ("gguf-output-name-adds-lines", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                                  c / "m\nSYSTEM pwned.gguf"],
     ["the GGUF file name holds the character '\\n'"]),
    ("modelfile-gguf-name-with-a-carriage-return", lambda w, c: [  # the error line itself stays one line
        "modelfile.py", "--gguf", with_file(c, "a\rFROM evil.gguf", b"GGUF"), "--output", c / "m.Modelfile"],
     ["a\\rFROM evil.gguf: the GGUF file name holds the character '\\r'"]),
    ("modelfile-gguf-name-with-a-quote", lambda w, c: [
        "modelfile.py", "--gguf", with_file(c, 'a"b.gguf', b"GGUF"), "--output", c / "m.Modelfile"],
     ["the GGUF file name holds the character '\"'"]),
    ("modelfile-temperature-nan", lambda w, c: modelfile_args(w, c, "temperature=nan"),
     ["temperature is nan; it must be a finite number, 0 or more"]),
    ("modelfile-top-p-inf", lambda w, c: modelfile_args(w, c, "top_p=inf"), ["top_p is inf; it must be between 0 and 1"]),
    ("modelfile-top-p-above-one", lambda w, c: modelfile_args(w, c, "top_p=1.5"), ["top_p is 1.5"]),
    ("modelfile-num-predict-minus-5", lambda w, c: modelfile_args(w, c, "num_predict=-5"),
     ["num_predict is -5; it must be -2 (fill the context), -1 (no limit) or more"]),
    ("modelfile-top-k-negative", lambda w, c: modelfile_args(w, c, "top_k=-1"), ["top_k is -1"]),
    ("modelfile-seed-fraction", lambda w, c: modelfile_args(w, c, "seed=1.5"), ["'1.5' is not an integer"]),
    ("modelfile-temperature-past-float32", lambda w, c: modelfile_args(w, c, "temperature=1e39"),
     ["temperature is 1e+39"]),
    ("gguf-repeat-penalty-negative", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output", c / "m.gguf",
                                                   "--parameter", "repeat_penalty=-1"], ["repeat_penalty is -1.0"]),
    # 6: each was a traceback
    ("merge-output-symlink-loop", lambda w, c: merge_args(w / "base", [w / "lora"], symlink_loop("merged")),
     ["the output is a symbolic link that cannot be followed"]),
    ("gguf-output-symlink-loop", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output",
                                               symlink_loop("m.gguf")],
     ["the output is a symbolic link that cannot be followed"]),
    ("modelfile-output-symlink-loop", lambda w, c: ["modelfile.py", "--gguf", w / "out" / "m-f16.gguf", "--output",
                                                    symlink_loop("m.Modelfile")],
     ["the output is a symbolic link that cannot be followed"]),
    ("modelfile-chat-template-not-utf8", lambda w, c: [
        "modelfile.py", "--gguf", gguf_bad_template(c, w, "bytes", sidecar=False), "--output", c / "m.Modelfile"],
     ["tokenizer.chat_template is not UTF-8 text (byte 0)"]),
    ("modelfile-chat-template-a-number", lambda w, c: [
        "modelfile.py", "--gguf", gguf_bad_template(c, w, "int", sidecar=False), "--output", c / "m.Modelfile"],
     ["tokenizer.chat_template is a uint32, not a string"]),
    ("merge-model-type-list", lambda w, c: merge_args(json_edit(c, w / "base", "base", "config.json",
                                                                model_type='["llama"]'), [w / "lora"], c / "m"),
     ['model_type is a JSON list (["llama"]), not a name']),
    ("gguf-model-type-dict", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf", "--model", json_edit(
        c, w / "merged", "m", "config.json", model_type='{"a": 1}')], ["model_type is a JSON dict"]),
    ("rank-pattern-not-a-regex", lambda w, c: merge_args(
        w / "base", [adapter_with(c, w, rank_pattern='{"q_proj(": 4}')], c / "out"),
     ["rank_pattern key 'q_proj(' is not a valid regular expression"]),
    ("alpha-pattern-not-a-regex", lambda w, c: merge_args(
        w / "base", [adapter_with(c, w, alpha_pattern='{"*": 4}')], c / "out"),
     ["alpha_pattern key '*' is not a valid regular expression"]),
    ("gguf-quality-of-another-vocabulary", lambda w, c: quality_args(w, c, f16_with_token(c, w, 600, "x")),
     ["the GGUF's token 600 is 'x'"]),
    ("gguf-quality-of-another-model", lambda w, c: quality_args(w, c, f16_of_another_model(c, w)),
     ["the GGUF's token_embd.weight has shape [512, "]),
    ("gguf-quality-truncated", lambda w, c: quality_args(w, c, truncated(c, w)),
     ["not a GGUF file, or a damaged one"]),
    ("gguf-quality-of-a-safetensors-file", lambda w, c: quality_args(w, c, w / "merged" / "model.safetensors"),
     ["not a GGUF file, or a damaged one"]),
    ("gguf-quality-llama-cpp-cannot-load", lambda w, c: quality_args(w, c, rewrite_gguf(
        w / "out" / "m-f16.gguf", c / "f16.gguf", drop_kv={"llama.embedding_length"}, sidecar=False)),
     ["llama.cpp cannot load this GGUF"]),
    # 7: messages that said something else
    ("merge-mistral-architecture-llama-model-type", lambda w, c: merge_args(json_edit(
        c, w / "base", "base", "config.json", architectures='["MistralForCausalLM"]', model_type='"llama"'),
        [w / "lora"], c / "m"),
     ["architecture 'MistralForCausalLM' is that of model_type 'mistral', but config.json says model_type 'llama'"]),
    # 8: a sweep of every path option: each was a silent success (a garbled file copied on) or a traceback
    ("merge-config-hidden-size-a-string", lambda w, c: merge_args(json_edit(
        c, w / "base", "base", "config.json", hidden_size='"64"'), [w / "lora"], c / "m"),
     ["config.json lacks or garbles 'hidden_size' (a JSON str \"64\", not a number)"]),
    ("merge-config-zero-heads", lambda w, c: merge_args(json_edit(
        c, w / "base", "base", "config.json", num_attention_heads="0"), [w / "lora"], c / "m"),
     ["the attention heads is 0; it must be a positive number"]),
    ("merge-config-vocab-minus-one", lambda w, c: merge_args(json_edit(
        c, w / "base", "base", "config.json", vocab_size="-1"), [w / "lora"], c / "m"),
     ["the vocabulary size is -1"]),
    ("merge-generation-config-a-list", lambda w, c: merge_args(folder_with(
        c, w / "base", "base", {"generation_config.json": "[1]"}), [w / "lora"], c / "m"),
     ["generation_config.json holds a JSON list, not an object"]),
    ("merge-generation-config-not-utf8", lambda w, c: merge_args(folder_with(
        c, w / "base", "base", {"generation_config.json": b'{"a": "\xff"}'}), [w / "lora"], c / "m"),
     ["generation_config.json is not UTF-8 text"]),
    ("gguf-config-layers-a-string", lambda w, c: ["export_gguf.py", "--output", c / "m.gguf", "--model", json_edit(
        c, w / "merged", "m", "config.json", num_hidden_layers='"2"')],
     ["config.json lacks or garbles 'num_hidden_layers' (a JSON str \"2\", not a number)"]),
    ("pth-config-intermediate-null", lambda w, c: ["export_pth.py", "--output", c / "pth", "--model", json_edit(
        c, w / "merged", "m", "config.json", intermediate_size="null")],
     ["config.json lacks or garbles 'intermediate_size'"]),
    ("inference-config-hidden-size-a-string", lambda w, c: [
        "inference.py", "--model", json_edit(c, w / "merged", "m", "config.json", hidden_size='"64"'),
        "--predictions-file", c / "p.json"], ["config.json lacks or garbles 'hidden_size'"]),
    ("inference-config-zero-heads", lambda w, c: [
        "inference.py", "--model", json_edit(c, w / "merged", "m", "config.json", num_attention_heads="0"),
        "--predictions-file", c / "p.json"], ["the attention heads is 0"]),
    ("inference-generation-config-null", lambda w, c: [
        "inference.py", "--model", folder_with(c, w / "merged", "m", {"generation_config.json": "null"}),
        "--predictions-file", c / "p.json"], ["generation_config.json holds a JSON null, not an object"]),
    ("perplexity-config-vocab-minus-one", lambda w, c: [
        "evaluate.py", "perplexity", "--model", json_edit(c, w / "merged", "m", "config.json", vocab_size="-1"),
        "--device", "cpu", "--output", c / "p.json"], ["the vocabulary size is -1"]),
]


def _put(path, data: bytes):
    """Write `data` to `path` (a case's input file) and return the path."""
    path.write_bytes(data)
    return path


# importance matrix (issue 23): refused before llama.cpp's tools are looked for or anything is written
CASES += [
    ("imatrix-text-not-utf8", lambda w, c: ["imatrix.py", "--model", w / "merged", "--text",
                                            _put(c / "t.txt", b"caf\xe9 \xff"), "--output", c / "m.imatrix.gguf"],
     ["the calibration text is not UTF-8 (byte 3)"]),
    ("imatrix-text-empty", lambda w, c: ["imatrix.py", "--model", w / "merged", "--text", _put(c / "t.txt", b" \n"),
                                         "--output", c / "m.imatrix.gguf"], ["the calibration text is empty"]),
    ("imatrix-output-not-gguf", lambda w, c: ["imatrix.py", "--model", w / "merged", "--text",
                                              _put(c / "t.txt", b"text"), "--output", c / "m.dat"],
     ["written in llama.cpp's GGUF format"]),
    ("gguf-iq2-without-imatrix", lambda w, c: ["export_gguf.py", "--model", w / "merged", "--output", c / "q.gguf",
                                               "--outtype", "iq2_xxs"],
     ["llama.cpp makes iq2_xxs only with an importance matrix"]),
]


@pytest.mark.parametrize("setup,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, setup, fragments):
    case = world / "cases" / tmp_path.name
    case.mkdir()
    cmd = setup(world, case)
    before = tree(world)
    env = {"OPENAI_API_KEY": "sk-test-not-sent"}
    proc = run_script(cmd[0], *cmd[1:], cwd=tmp_path, env_extra=env)
    after = tree(world)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "Fix:" in errors[0]
    assert "weights_only=False" not in proc.stderr
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


def test_a_zero_element_tensor_in_the_base_is_merged(world, tmp_path):
    """A valid header may hold an empty tensor: it is carried through, in order, not a writer error."""
    import torch
    from safetensors import safe_open

    base = tmp_path / "base"
    shutil.copytree(world / "base", base)
    f = base / "model-00001-of-00002.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["model.extra_empty"] = {"dtype": "F16", "shape": [0], "data_offsets": [end, end]}
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra_empty"] = f.name
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_safetensors(f, lambda h: h.update(header))
    run_script(*merge_args(base, [world / "lora"], tmp_path / "out"), check=True, cwd=tmp_path)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as m, \
            safe_open(world / "merged" / "model.safetensors", "pt") as ref:
        assert list(m.get_tensor("model.extra_empty").shape) == [0]
        assert set(m.keys()) == set(ref.keys()) | {"model.extra_empty"}
        for k in ref.keys():  # the other tensors as without it
            assert torch.equal(m.get_tensor(k), ref.get_tensor(k)), k


# --- out of disk space: a real full file system (a small tmpfs; root only) ---------------------


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_out_of_space_is_one_line_with_the_bytes_needed(world, small_disk, tmp_path):
    proc = run_script(*merge_args(world / "base", [world / "lora"], small_disk / "merged"), cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"llamaforge: error: {small_disk}: no space left on the device (")
    need = sum(f.stat().st_size for f in (world / "merged").glob("*.safetensors"))
    import re

    m = re.search(r"\((\d+) bytes needed, (\d+) free\)", errors[0])
    assert m and int(m.group(1)) >= 0.99 * need and int(m.group(2)) < int(m.group(1)), errors[0]
    assert list(small_disk.iterdir()) == []  # the temp output is gone


def test_running_out_of_space_midway_removes_the_temp_output(tmp_path):
    import errno

    from llamaforge.errors import LlamaforgeError
    from llamaforge.files.atomic import atomic_dir

    with pytest.raises(LlamaforgeError, match=r"no space left on the device \(1234 bytes needed"):
        with atomic_dir(tmp_path / "out", need_bytes=1234) as tmp:
            (tmp / "a").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --- replacing llamaforge's own earlier outputs still works ------------------------------------


def test_own_earlier_outputs_are_replaced(world, tmp_path):
    cases = world / "cases" / "replace"
    cases.mkdir()
    for args, target in (
        (merge_args(world / "base", [world / "lora"], cases / "merged"), cases / "merged"),
        (["export_pth.py", "--model", world / "merged", "--output", cases / "pth"], cases / "pth" / "SHA256SUMS"),
        (["export_gguf.py", "--model", world / "merged", "--output", cases / "m.gguf"], cases / "m.gguf"),
        (["merge_tokenizers.py", "--base", world / "sp" / "base.model", "--extra", world / "sp" / "chinese.model",
          "--output", cases / "tok"], cases / "tok" / "merge_report.json"),
    ):
        run_script(*args, check=True, cwd=tmp_path)
        first = target.stat().st_mtime_ns
        run_script(*args, check=True, cwd=tmp_path)  # the second run replaces the first's output
        assert target.stat().st_mtime_ns != first
    assert (cases / "m.gguf.sha256").read_text().split()[1] == "m.gguf"
    # nothing hidden is left beside them
    assert sorted(p.name for p in cases.iterdir()) == ["m.Modelfile", "m.gguf", "m.gguf.sha256", "merged", "pth", "tok"]


# --- no leftovers a later run keeps -------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_replacement_killed_midway_leaves_nothing_after_the_next_run(tmp_path):
    from llamaforge.files.atomic import _HOST, atomic_dir

    target = tmp_path / "merged"
    # what a writer killed between moving the old output aside and renaming the new one leaves
    old = tmp_path / f".merged.tmp-{_HOST}-{_dead_pid()}-old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old")
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_gguf_and_its_sha256_never_disagree_when_killed_between_renames(world, tmp_path, monkeypatch):
    """A kill (here: an interrupt at the second rename) leaves the .sha256 missing, so Snakemake reruns
    the job; never a new GGUF beside its predecessor's hash."""
    import llamaforge.files.atomic as fsutil
    from llamaforge.export.gguf import export_gguf

    out = tmp_path / "m.gguf"
    export_gguf(world / "merged", out, "f16", echo=lambda *a: None)
    old_sums = (tmp_path / "m.gguf.sha256").read_text()
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(world / "merged", out, "q8_0", echo=lambda *a: None)
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == ["m.gguf", "m.gguf.sha256"]
    sums = tmp_path / "m.gguf.sha256"
    assert not sums.exists() or sums.read_text().split()[0] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert not sums.exists() and old_sums  # this interruption: the hash is missing, the job reruns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --- the hash cache sees a file rewritten with its mtime put back -------------------------------


def test_hash_cache_keys_on_ctime(tmp_path, monkeypatch):
    import llamaforge.files.hashing as fsutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fsutil, "_CACHE_MIN", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    first = fsutil.sha256_cached(f)
    with open(f, "r+b") as fh:  # rewritten in place, same size, mtime put back
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert fsutil.sha256_cached(f) == hashlib.sha256(b"b" + b"a" * 99).hexdigest() != first


# --- issue 20: ownership marks, deterministic bytes, correct reading of what was refused before -------


def test_ownership_marks_are_specific_to_each_kind(world, tmp_path):
    """Each kind of output is recognised by what only its writer writes, whole: never by a first line a
    user may type, never as another kind."""
    from llamaforge.export import modelfile, pth  # noqa: F401  (each writer registers its mark)
    from llamaforge.files import checksums, guard  # noqa: F401
    from llamaforge.generate import generation  # noqa: F401
    from llamaforge.files.checksums import verify_to_report
    from llamaforge.files.guard import _OWN
    from llamaforge.export.modelfile import modelfile_text, write_modelfile

    def own(kind, name, content):
        p = tmp_path / kind / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return _OWN[kind][1](p)

    mf = modelfile_text("m.gguf", "<|im_start|>", {"temperature": 0.7, "num_predict": -2, "seed": 3})
    assert own("modelfile", "a", mf) is True
    assert own("modelfile", "b", "# llamaforge build notes\nFROM ./m.gguf\n") is False
    assert own("modelfile", "c", mf + "SYSTEM be terse\n") is False  # the user's edit makes it theirs
    assert own("modelfile", "d", (world / "pth" / "SHA256SUMS").read_text()) is False
    sums_line = (world / "out" / "m-f16.gguf.sha256").read_text()
    assert own("sha256", "m-f16.gguf.sha256", sums_line) is True
    assert own("sha256", "x.gguf.sha256", sums_line) is False  # it names another file
    assert own("verify_report", "r", "# llamaforge verify\nOK       a  " + "0" * 64 + "\n") is True
    assert own("verify_report", "s", "# llamaforge verify\nmy notes\n") is False
    assert own("verify_report", "t", mf) is False
    perplexity = guard.json_of_kind("perplexity")
    for name, text, mine in (("p.json", '{"llamaforge": "perplexity", "perplexity": 3.0}', True),
                             ("q.json", '{"llamaforge": "my notes"}', False),
                             ("s.json", '{"llamaforge": "summary", "model": "m"}', False)):  # another kind
        (tmp_path / name).write_text(text)
        assert perplexity(tmp_path / name) is mine, name
    rec = '[{"instruction": "i", "input": "", "prompt": "p", "output": "o"}]'
    assert own("predictions", "p.json", rec) is True
    assert own("predictions", "a.json", '[{"instruction": "i", "input": "", "output": "o"}]') is False
    assert _OWN["pth"][1](world / "pth") is True
    mixed = tmp_path / "pth"
    shutil.copytree(world / "pth", mixed)
    (mixed / "mine.txt").write_text("x")
    assert _OWN["pth"][1](mixed) is False
    # and llamaforge's own replace each other
    out = tmp_path / "again" / "m.Modelfile"
    for temp in (0.5, 0.9):
        write_modelfile(world / "out" / "m-f16.gguf", {"temperature": temp}, out)
    assert "PARAMETER temperature 0.9\n" in out.read_text() and "temperature 0.5" not in out.read_text()
    report = tmp_path / "again" / "report"
    for _ in range(2):
        verify_to_report({}, [world / "pth" / "SHA256SUMS"], report, echo=lambda *a: None)
    assert report.read_text().startswith("# llamaforge verify\nOK       ")
    with pytest.raises(RuntimeError, match="'no_such_kind'"):  # a kind no writer registered: never guessed
        guard.guard_output(tmp_path / "again" / "x", "no_such_kind")


def test_modelfile_parameters_take_ollamas_whole_ranges(world, tmp_path):
    from llamaforge.export.modelfile import check_parameters, modelfile_text, parse_parameters

    edges = ["temperature=0", "top_p=0", "top_p=1", "num_predict=-2", "num_predict=-1", "top_k=0", "seed=-1",
             "repeat_penalty=1.1"]
    got = parse_parameters(None, None, edges)
    assert got == {"temperature": 0.0, "top_p": 1.0, "num_predict": -1, "top_k": 0, "seed": -1,
                   "repeat_penalty": 1.1}
    text = modelfile_text("m.gguf", None, got)
    assert "PARAMETER num_predict -1\n" in text and "PARAMETER top_p 1.0\n" in text
    assert text.splitlines()[1] == "FROM ./m.gguf"
    with pytest.raises(Exception, match=r"top_p is 2"):
        check_parameters({"top_p": 2})  # the library refuses what the command line would
    with pytest.raises(Exception, match=r"temperature is True"):
        check_parameters({"temperature": True})


def _chat_template_model(world: Path, dst: Path, templates) -> Path:
    shutil.copytree(world / "merged", dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["chat_template"] = templates
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


NAMED = [{"name": "zeta", "template": "Z"}, {"name": "default", "template": "{{ '<|im_start|>' }}"},
         {"name": "tool use", "template": "T"}, {"name": "alpha", "template": "A"}]


def test_a_list_of_chat_templates_is_written_in_name_order(world, tmp_path):
    """The default is tokenizer.chat_template (the Modelfile's format follows it); the others are
    tokenizer.chat_template.NAME in name order, and tokenizer.chat_templates lists them so."""
    import gguf

    from llamaforge.export.gguf import export_gguf

    model = _chat_template_model(world, tmp_path / "m", NAMED)
    out = tmp_path / "m.gguf"
    export_gguf(model, out, "f16", echo=lambda *a: None, modelfile={})
    r = gguf.GGUFReader(out)
    keys = [k for k in r.fields if k.startswith("tokenizer.chat_template")]
    assert keys == ["tokenizer.chat_template.alpha", "tokenizer.chat_template.tool_use",
                    "tokenizer.chat_template.zeta", "tokenizer.chat_templates", "tokenizer.chat_template"]
    assert [bytes(r.fields["tokenizer.chat_templates"].parts[i]).decode()
            for i in r.fields["tokenizer.chat_templates"].data] == ["alpha", "tool_use", "zeta"]
    assert bytes(r.fields["tokenizer.chat_template"].parts[-1]).decode() == "{{ '<|im_start|>' }}"
    assert bytes(r.fields["tokenizer.chat_template.zeta"].parts[-1]).decode() == "Z"
    assert "<|im_start|>user" in (tmp_path / "m.Modelfile").read_text()  # chatml, from the default


@pytest.mark.slow
def test_a_list_of_chat_templates_gives_the_same_bytes_under_any_hash_seed(world, tmp_path):
    model = _chat_template_model(world, tmp_path / "m", NAMED * 0 + [dict(e) for e in NAMED] + [
        {"name": f"t{i}", "template": str(i)} for i in range(8)])
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / f"m{seed}.gguf"
        run_script("export_gguf.py", "--model", model, "--output", out, "--no-modelfile", check=True,
                   env_extra={"PYTHONHASHSEED": seed})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_llama3_tokenizer_model_saved_with_crlf_or_a_bom_reads_as_itself(tmp_path):
    import base64

    from llamaforge.tokenizer import _tiktoken_ranks, is_tiktoken_model

    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    want = {bytes([i]): i for i in range(256)}
    for name, data in (("lf", "\n".join(lines) + "\n"), ("crlf", "\r\n".join(lines) + "\r\n"),
                       ("bom", "\ufeff" + "\n".join(lines) + "\n")):
        p = tmp_path / name
        p.write_bytes(data.encode("utf-8"))
        assert is_tiktoken_model(p), name
        assert _tiktoken_ranks(p) == want, name


def test_a_reply_with_a_lone_surrogate_or_wrong_types_is_stored(tmp_path):
    """A hostile or broken server: a lone surrogate in the text, usage that is no count, choices that are
    no list, the key in finish_reason or JSON-escaped in the text. The reply is kept, readable, without
    the key; a later run resumes from it."""
    import types

    from llamaforge.crawl.client import _redact, _reply_fields
    from llamaforge.crawl.store import _Store

    key = "sk-adv-SECRET/key-0123"
    escaped = "".join(f"\\u{ord(ch):04x}" if ch in "sS" else ("\\/" if ch == "/" else ch) for ch in key)
    content = ('[{"instruction": "abc \\ud800 def: explain the basics of quantum physics", "input": "", '
               f'"output": "your key is {escaped} ok"}}]')
    ns = types.SimpleNamespace
    reply = ns(choices=[ns(message=ns(content=content), finish_reason=key)],
               usage=ns(prompt_tokens="many", completion_tokens=-5))
    text, usage, finish = _reply_fields(reply)
    assert usage == {"prompt_tokens": 0, "completion_tokens": 0}
    assert _redact(finish, key) == "***"
    assert _reply_fields(ns(choices={"a": 1}, usage=None)) == ("", None, None)
    store = _Store(tmp_path / "c.jsonl", tmp_path / "c.raw.jsonl", 0, 5, 0.7)
    store.add_reply(0, _redact(text, key), usage, 1, _redact(finish, key))
    store.close()
    raw = (tmp_path / "c.raw.jsonl").read_text(encoding="utf-8")
    items = (tmp_path / "c.jsonl").read_text(encoding="utf-8")
    assert "SECRET" not in raw and "SECRET" not in items and escaped not in raw
    assert json.loads(items)["instruction"] == "abc \ufffd def: explain the basics of quantum physics"
    assert json.loads(items)["output"] == "your key is *** ok"
    again = _Store(tmp_path / "c.jsonl", tmp_path / "c.raw.jsonl", 0, 5, 0.7)  # resumes from it
    assert again.done == {0} and len(again.items) == 1
    again.close()


def test_a_torn_last_line_that_is_a_whole_record_is_kept(tmp_path):
    from llamaforge.crawl.store import _Store

    (tmp_path / "c.raw.jsonl").write_text(RAW_RECORD.rstrip("\n"))  # a record without its line end
    store = _Store(tmp_path / "c.jsonl", tmp_path / "c.raw.jsonl", 0, CRAWL_ITEMS_PER_REQUEST, 0.7)
    store.close()
    assert store.done == {0}
    assert (tmp_path / "c.raw.jsonl").read_text() == RAW_RECORD  # the line end added, the record kept


@pytest.mark.parametrize("edit,bad", [
    (lambda c: c["models"].update({"demo\n": {"base": "resources/demo/base"}}), "demo\n"),
    (lambda c: c["crawl"].update({"a": {"model": "m", "num_requests": 1},
                                  "a.stats": {"model": "m", "num_requests": 1}}), "a.stats"),
    (lambda c: c["crawl"].update({"a.raw": {"model": "m", "num_requests": 1}}), "a.raw"),
    (lambda c: c["crawl"].update({"a": {"model": "m", "num_requests": 10**11}}), "100000000000"),
    (lambda c: c["eval"].update({"generation": {"seed": -1}}), "-1"),
    (lambda c: c["demo"].update({"seed": 10**20}), "100000000000000000000"),
])
def test_the_config_schema_refuses_what_would_collide_or_crash(edit, bad):
    import copy

    import yaml
    from snakemake.utils import validate

    from helpers import REPO

    cfg = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    validate(copy.deepcopy(cfg), str(REPO / "schemas" / "config.schema.yaml"))  # the shipped config passes
    edit(cfg)
    with pytest.raises(Exception, match=re.escape(bad.strip()) if bad.strip() else ".") as e:
        validate(cfg, str(REPO / "schemas" / "config.schema.yaml"))
    assert "ValidationError" in type(e.value).__name__ or "WorkflowError" in type(e.value).__name__


def test_an_api_key_no_header_can_carry_is_one_error_without_the_key():
    from llamaforge.crawl import check_api_key
    from llamaforge.errors import LlamaforgeError

    check_api_key("sk-proj-AZaz09_-.")
    for key, said in (("sk-secret-123\r", r"'\r' at its end"), ("sk-secret-ü123", r"'\xfc' in it"),
                      ("sk-secret 123", "' ' in it")):
        with pytest.raises(LlamaforgeError) as e:
            check_api_key(key)
        assert said in str(e.value) and "secret" not in str(e.value), str(e.value)
