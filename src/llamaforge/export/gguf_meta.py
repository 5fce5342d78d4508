"""What llama.cpp's `convert_hf_to_gguf.py` writes for a model of the family table, without its
tensors: each tensor's GGML type and size, the KV metadata (hyper-parameters, rope, the vocabulary
of a SentencePiece or byte-level BPE tokenizer, special tokens, chat templates) and the extra
tensors (rope_freqs). No torch at import.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LlamaforgeError
from ..files.guard import owned_by
from ..files.reading import read_json
from ..model import TensorName, TokenizerKind
from ..model.prompts import ALPACA_CHAT_TEMPLATE, FORMATS, jinja_chat_template  # noqa: F401 (a name tests use)
from .gguf_rope import extra_tensor_shapes, extra_tensors, llama3_rope_factors, phi3_rope_keys  # noqa: F401

if TYPE_CHECKING:  # torch only where a tensor is converted: the metadata and the checks need none
    from ..model import ModelFolder

GGUF_TYPES = ("f16", "bf16", "q8_0")
GGUF_OWN_KEY = "llamaforge.version"  # written into every GGUF llamaforge writes: its mark as llamaforge's output


@owned_by("gguf", "GGUF file")
def _gguf_is_own(path: Path) -> bool:
    try:
        import gguf

        field = gguf.GGUFReader(path, "r").fields.get(GGUF_OWN_KEY)
        return field is not None and field.types == [gguf.GGUFValueType.STRING]
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def load_gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency
        raise LlamaforgeError("the gguf package is not installed", None, "pip install gguf") from None
    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines ("for Little Endian only") are noise
    return gguf


def gguf_qtype(gguf, t: TensorName, shape: tuple[int, ...], outtype: str):
    """The GGML type of a tensor, as convert_hf_to_gguf.py (TextModel.prepare_tensors) chooses it:
    1-D tensors and norms F32; everything else the requested type, token_embd and output included;
    a Q8_0 tensor whose rows are not a multiple of the 32-element block falls back to F16 (the
    QuantError fallback there)."""
    Q = gguf.GGMLQuantizationType
    if t.norm or len(shape) <= 1:
        return Q.F32
    if outtype == "f16":
        return Q.F16
    if outtype == "bf16":
        return Q.BF16
    block, _ = gguf.GGML_QUANT_SIZES[Q.Q8_0]
    return Q.Q8_0 if shape[-1] % block == 0 else Q.F16


def gguf_nbytes(gguf, qtype, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _token_vocab(model) -> dict:
    """tokens, scores, types and special ids from tokenizer.model (+ special_tokens_map.json, and
    config.json's pad_token_id when they name no pad), padded to the embedding rows as
    convert_hf_to_gguf.py's _create_vocab_sentencepiece does."""
    from ..tokenizer import UNUSED

    proto = model.sentencepiece
    vocab = model.dims.vocab
    pieces = proto.pieces
    if len(pieces) > vocab:
        raise LlamaforgeError(
            f"tokenizer.model has {len(pieces)} pieces but the model has {vocab} embedding rows", model.tokenizer.model,
            "use the tokenizer the model was merged with",
        )
    tokens = [p.piece.encode("utf-8") for p in pieces]
    scores = [float(p.score) for p in pieces]
    # sentencepiece_model.proto numbers its types as gguf.TokenType does:
    # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    types = [int(p.type) for p in pieces]
    for i in range(len(pieces), vocab):
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-10000.0)
        types.append(UNUSED)
    # tokens the Hugging Face files add or re-declare (Mistral's and Llama-2's tokenizer_config.json
    # list <unk>, <s>, </s> in added_tokens_decoder): typed and scored as the converter does
    USER_DEFINED, CONTROL = 4, 3
    at_path = model.folder / "added_tokens.json"
    if at_path.is_file():
        for key, tid in read_json(at_path, "added_tokens.json").items():
            if 0 <= int(tid) < vocab:
                tokens[int(tid)], scores[int(tid)], types[int(tid)] = key.encode("utf-8"), -1000.0, USER_DEFINED
    tc_path = model.folder / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
    phi3 = model.family.sp_vocab == "phi3"  # Phi3MiniModel.set_vocab's rules (Family.sp_vocab)
    added = list((tc.get("added_tokens_decoder") or {}).items())
    if phi3 and model.tokenizer.json is not None:
        tj = read_json(model.tokenizer.json, "tokenizer.json")
        added += [(a["id"], a) for a in (tj.get("added_tokens") or []) if isinstance(a, dict)]
    for tid, data in added:
        tid, token = int(tid), data["content"]
        if not 0 <= tid < vocab:
            continue
        if data.get("special") or (not phi3 and _looks_special(token)):
            types[tid] = CONTROL
        else:
            token = token if phi3 else token.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid] = -1000.0
        tokens[tid] = token.encode("utf-8")
    ids = dict(model.special_ids)
    if "pad" not in ids and model.config.get("pad_token_id") is not None:
        pid = int(model.config["pad_token_id"])
        if 0 <= pid < vocab:
            ids["pad"] = pid
    add_bos = bool(tc.get("add_bos_token", True))
    add_eos = bool(tc.get("add_eos_token", False))
    return {"tokens": tokens, "scores": scores, "types": types, "ids": ids, "add_bos": add_bos, "add_eos": add_eos,
            "pieces": len(pieces)}


@functools.lru_cache(maxsize=1)
def pre_tokenizer_table() -> tuple[str, dict[str, str]]:
    """(chktxt, {sha256 of its encoding: pre-tokenizer name}) of llama.cpp's convert_hf_to_gguf.py
    (get_vocab_base_pre), shipped in llamaforge/data/gguf_pre_tokenizers.json."""
    from importlib import resources

    data = json.loads(resources.files("llamaforge").joinpath("data", "gguf_pre_tokenizers.json")
                      .read_text(encoding="utf-8"))
    return data["chktxt"], dict(data["hashes"])  # later entries win, as the converter's chain of ifs


def pre_tokenizer(tok, path) -> str:
    """The tokenizer.ggml.pre name of a Hugging Face tokenizer, decided as llama.cpp's converter does:
    encode a fixed text (special tokens included, so a BOS counts) and look the sha256 of the id list
    up; an unknown hash is an error, never a silent default (llama.cpp would pre-tokenize it wrong).
    Tokens added to a known base (add_tokens, e.g. Chinese words) change the text's encoding
    (llama.cpp#8649): the name is then the base's, found with the added tokens in the text set aside
    (llama.cpp matches them before it pre-tokenizes, as Hugging Face does); else an error too."""
    chktxt, table = pre_tokenizer_table()
    chkhsh = hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()
    name = table.get(chkhsh)
    base, aside = tok.without_added_in(chktxt) if name is None and hasattr(tok, "without_added_in") else (None, [])
    if base is not None:
        base_hsh = hashlib.sha256(str(base.encode(chktxt)).encode()).hexdigest()
        name = table.get(base_hsh)
        chkhsh += f", nor its base's with the added tokens {', '.join(map(repr, aside))} set aside: {base_hsh}"
    if name is None:
        raise LlamaforgeError(
            f"llama.cpp does not know this tokenizer's pre-tokenizer (chkhsh {chkhsh})", path,
            "use the tokenizer.json released with the base model (llama.cpp recognises Llama-3, Qwen2, SmolLM2 and "
            "others by it); a tokenizer of your own needs its hash added to llama.cpp's convert_hf_to_gguf_update.py")
    return name


def _bpe_vocab(model) -> dict:
    """tokens and types of a byte-level BPE tokenizer, as convert_hf_to_gguf.py's get_vocab_base:
    the vocabulary by id padded to the embedding rows with [PAD{id}] (UNUSED), added special tokens
    (and those that look special, <|...|>) CONTROL, other added tokens USER_DEFINED."""
    from ..tokenizer import FastTokenizer

    gguf = load_gguf()
    T = gguf.TokenType
    _ = model.vocab_length  # the folder's one tokenizer check (cached: made once per ModelFolder)
    tok = FastTokenizer(model.folder)
    vocab = tok.get_vocab()
    rows = model.dims.vocab
    if vocab and max(vocab.values()) >= rows:
        raise LlamaforgeError(f"the tokenizer has ids up to {max(vocab.values())} but the model has {rows} embedding rows",
                              model.tokenizer.json, "use the tokenizer the model was merged with")
    pre = pre_tokenizer(tok, model.tokenizer.json)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        tokens.append(token)
    return {"tokens": tokens, "types": types, "pre": pre}


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def gguf_metadata(gguf, writer, model, outtype: str, name: str) -> None:
    """The KV metadata of convert_hf_to_gguf.py's LlamaModel / Qwen2Model (TextModel.set_gguf_parameters,
    LlamaModel.set_gguf_parameters and set_vocab: _set_vocab_sentencepiece or _set_vocab_gpt2)."""
    d = model.dims
    llama_rules = model.family.llama_gguf_rules
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(d.n_layers)
    writer.add_context_length(d.max_positions)
    writer.add_embedding_length(d.hidden)
    writer.add_feed_forward_length(d.intermediate)
    writer.add_head_count(d.n_heads)
    writer.add_head_count_kv(d.n_kv_heads)
    rtype, rp = str(model.rope.type).lower(), model.rope.parameters
    if model.family.rope_keys == "phi3":
        phi3_rope_keys(writer, model)
    elif rtype == "linear" and rp.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "yarn" and rp.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rp["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rtype == "llama3" and llama_rules:
        pass  # rope_freqs.weight (extra_tensors)
    elif rtype not in ("default", "none"):
        raise LlamaforgeError(f"rope scaling {rtype!r} is not supported by this exporter", model.folder / "config.json",
                              "export with llama.cpp's convert_hf_to_gguf.py")
    writer.add_rope_freq_base(d.rope_theta)
    if model.rope.swa_theta is not None:  # the sliding-window layers' own base (Gemma-3)
        writer.add_rope_freq_base_swa(model.rope.swa_theta)
    writer.add_layer_norm_rms_eps(d.norm_eps)
    if model.config.get("head_dim") is not None and model.family.rope_keys == "text":
        writer.add_key_length(d.hd)
        writer.add_value_length(d.hd)
    _family_keys(gguf, writer, model)
    writer.add_file_type(ftype)
    if llama_rules:
        writer.add_vocab_size(d.vocab)
        writer.add_rope_dimension_count(d.hd)
    if model.tokenizer.kind is TokenizerKind.SENTENCEPIECE:
        _sentencepiece_metadata(gguf, writer, model)
    else:
        v = _bpe_vocab(model)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(v["pre"])
        writer.add_token_list(v["tokens"])
        writer.add_token_types(v["types"])
        from .gguf_vocab import SpecialVocab

        sv = SpecialVocab(model.folder, load_merges=True)
        sv.chat_template = _chat_template(model.folder)
        sv.add_to_gguf(writer, quiet=True)
        if llama_rules and d.vocab == 49152:
            writer.add_add_bos_token(False)  # the converter's rule for this vocabulary size (Granite, SmolLM)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # by this key a later run knows the file as its own output (and may replace it)
    from .. import __version__

    writer.add_string(GGUF_OWN_KEY, __version__)


def _family_keys(gguf, writer, model: ModelFolder) -> None:
    """The family entry's own keys from config.json (Family.gguf_keys), where config.json sets them."""
    arch = model.family.gguf_arch
    for suffix, key, vtype, default in model.family.gguf_keys:
        value = model.config.get(key)
        if value is None:
            value = default
        if value is None:
            continue
        try:
            value = float(value) if vtype == "float32" else int(value)
        except (TypeError, ValueError):
            raise LlamaforgeError(f"config.json's {key} is {value!r}, not a number", model.config_path,
                                  "restore the config.json written with the model") from None
        writer.add_key_value(f"{arch}.{suffix}", value, getattr(gguf.GGUFValueType, vtype.upper()))


def _sentencepiece_metadata(gguf, writer, model: ModelFolder) -> None:
    v = _token_vocab(model)
    if model.family.space_prefix is not None:
        writer.add_add_space_prefix(model.family.space_prefix)
    elif model.family.llama_gguf_rules:
        tc_path = model.folder / "tokenizer_config.json"
        tc = read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
        if isinstance(tc, dict) and tc.get("add_prefix_space") is not None:
            writer.add_add_space_prefix(bool(tc["add_prefix_space"]))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(v["tokens"])
    writer.add_token_scores(v["scores"])
    writer.add_token_types(v["types"])
    # the special ids, add_bos/add_eos/add_sep and the chat template as the converter takes them
    # (gguf-py's SpecialVocab: tokenizer.json's post-processor, tokenizer_config.json, config.json);
    # the SentencePiece model's own ids where those files name none (a bare tokenizer.model folder)
    from .gguf_vocab import SpecialVocab

    sv = SpecialVocab(model.folder, n_vocab=len(v["tokens"]))
    for key, tid in v["ids"].items():
        sv.special_token_ids.setdefault(key, tid)
    sv.add_special_token.setdefault("bos", v["add_bos"])
    sv.add_special_token.setdefault("eos", v["add_eos"])
    # a tokenizer without a chat template gets its family's prompt style (the Chinese-Alpaca recipe's)
    sv.chat_template = _chat_template(model.folder) or jinja_chat_template(FORMATS[model.family.prompt_style])
    sv.add_to_gguf(writer, quiet=True)


def _chat_template(folder):
    """The chat template(s) of a tokenizer folder as SpecialVocab.add_to_gguf writes them: a string,
    or [default, then the named ones sorted by name] (tokenizer.chat_templates validates them)."""
    from ..tokenizer import chat_templates

    default, named = chat_templates(folder)
    if named:
        return [{"name": "default", "template": default}] + [{"name": k, "template": v} for k, v in named.items()]
    return default
