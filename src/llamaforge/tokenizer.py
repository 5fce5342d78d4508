"""SentencePiece vocabulary merge and Hugging Face tokenizer files.

The merge is the one of Chinese-LLaMA-Alpaca's `merge_tokenizers.py`: parse both `ModelProto`s,
append every piece of the extra model that the base lacks, in order, with score 0, then append
each `--add-token` (e.g. `[PAD]`) the same way, and serialize. For the real LLaMA and Chinese
models this reproduces the published `tokenizer.model` files byte for byte.

Beside `tokenizer.model` we write the Hugging Face files ourselves. `tokenizer_config.json` names
transformers 5's SentencePiece backend (`SentencePieceBackend`, with `special_tokens_pattern: bos`),
so `AutoTokenizer.from_pretrained(folder)` encodes with sentencepiece itself: exactly as
`tokenizer.model` does. A tokenizers-BPE `tokenizer.json` cannot: when two overlapping merges have
the *same* score (the 17953 appended Chinese pieces all score 0) SentencePiece takes the leftmost
and a rank-based BPE the lower rank, which differs on runs of digits and whitespace. We still
write one (merges ordered by score, SentencePiece's normalisation) for tools that read
tokenizer.json alone. That backend's decode joins pieces as text (byte pieces stay "<0x0A>"), so
`load_hf_tokenizer` gives the tokenizer sentencepiece's own decode (`exact_sentencepiece_decode`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import LlamaforgeError
from .fsutil import atomic_dir, guard_output, require_file

log = logging.getLogger(__name__)

# The test sentence of the original merge script.
TEST_SENTENCE = (
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
    "The primary use of LLaMA is research on large language models, including"
)

# sentencepiece_model.proto piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except ImportError:  # very old sentencepiece wheels
        from transformers.utils import sentencepiece_model_pb2_new as pb2  # type: ignore
    return pb2


def load_proto(path: str | os.PathLike, what: str = "SentencePiece model"):
    """Parse a SentencePiece `ModelProto`, with a clear error when it is not one."""
    path = require_file(path, what)
    data = path.read_bytes()
    proto = _pb2().ModelProto()
    fix = "point to a SentencePiece model file (tokenizer.model), not a tokenizer.json, vocab or weights file"
    try:
        proto.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise LlamaforgeError(f"not a SentencePiece model ({type(e).__name__})", path, fix) from None
    if len(proto.pieces) == 0 or not proto.HasField("trainer_spec"):
        raise LlamaforgeError("not a SentencePiece model (no pieces)", path, fix)
    return proto


@dataclass
class MergeResult:
    base_pieces: int
    extra_pieces: int
    added: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    merged_pieces: int = 0


def merge_protos(base, extra, add_tokens=(), base_path="base", extra_path="extra"):
    """Return (merged proto, MergeResult). `base` is not modified."""
    pb2 = _pb2()
    merged = pb2.ModelProto()
    merged.CopyFrom(base)
    present = {p.piece for p in merged.pieces}
    result = MergeResult(base_pieces=len(base.pieces), extra_pieces=len(extra.pieces))
    for p in extra.pieces:
        if p.piece not in present:
            new = pb2.ModelProto.SentencePiece()
            new.piece = p.piece
            new.score = 0
            merged.pieces.append(new)
            present.add(p.piece)
            result.added.append(p.piece)
    for i, tok in enumerate(add_tokens):
        if not tok:
            raise LlamaforgeError("--add-token is empty", None, "give the token text, e.g. --add-token '[PAD]'")
        if tok in add_tokens[:i]:
            raise LlamaforgeError(f"--add-token {tok!r} is given twice", None,
                                  "give each added token once (add_tokens in config.yaml, or --add-token)")
        if tok in present:
            raise LlamaforgeError(
                f"--add-token {tok!r} is already a piece of the merged vocabulary",
                base_path if tok in {p.piece for p in base.pieces} else extra_path,
                f"drop --add-token {tok!r} (or add_tokens in config.yaml); it would be a duplicate",
            )
        new = pb2.ModelProto.SentencePiece()
        new.piece = tok
        new.score = 0
        merged.pieces.append(new)
        present.add(tok)
        result.added_tokens.append(tok)
    result.merged_pieces = len(merged.pieces)
    return merged, result


# ---------------------------------------------------------------------------------------------
# Hugging Face files


def _special_ids(proto) -> dict[str, int]:
    ts = proto.trainer_spec
    out = {}
    for name, idx in (("unk", ts.unk_id), ("bos", ts.bos_id), ("eos", ts.eos_id), ("pad", ts.pad_id)):
        if 0 <= idx < len(proto.pieces):
            out[name] = idx
    return out


def special_ids(proto, folder: str | os.PathLike | None = None) -> dict[str, int]:
    """unk/bos/eos/pad ids of a tokenizer: the SentencePiece trainer spec, overridden by the
    folder's special_tokens_map.json where it names pieces of the model, and a `[PAD]`/`<pad>`
    piece (Chinese-Alpaca's) as pad when nothing else names one."""
    ids = _special_ids(proto)
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    stm = Path(folder) / "special_tokens_map.json" if folder is not None else None
    if stm is not None and stm.is_file():
        from .fsutil import read_json

        data = read_json(stm, "special_tokens_map.json")
        if not isinstance(data, dict):
            raise LlamaforgeError("special_tokens_map.json is not a JSON object", stm,
                                  "restore it from the tokenizer's release")
        for key in ("unk", "bos", "eos", "pad"):
            tok = data.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok in index:
                ids[key] = index[tok]
    if "pad" not in ids:
        pad = next((i for i, p in enumerate(proto.pieces) if p.piece in ("[PAD]", "<pad>") and i not in ids.values()),
                   None)
        if pad is not None:
            ids["pad"] = pad
    return ids


def pad_token_of(add_tokens) -> str | None:
    """The added token that serves as padding: the first whose name says 'pad'."""
    for t in add_tokens:
        if "pad" in t.lower():
            return t
    return None


def build_tokenizer_json(proto, extra_special: list[str] = ()) -> dict:
    """A `tokenizers` BPE definition that segments text as SentencePiece does (see module doc)."""
    if proto.trainer_spec.model_type != 2:  # BPE
        raise LlamaforgeError(
            "only BPE SentencePiece models (as LLaMA's) can be written as a fast tokenizer; this one is "
            f"model_type={proto.trainer_spec.model_type}",
            None,
            "use a LLaMA-style BPE base model",
        )
    pieces = proto.pieces
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p.piece, i)
    normal = {p.piece for p in pieces if p.type == NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL or p.piece in extra_special:
            continue
        s = p.piece
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [[left, right] for *_, left, right in ranked]

    specials = _special_ids(proto)
    added = []
    for i, p in enumerate(pieces):
        special = p.type in (CONTROL, UNKNOWN) or p.piece in extra_special
        if special or p.type == USER_DEFINED:
            added.append({"id": i, "content": p.piece, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": special})
    bos = pieces[specials["bos"]].piece if "bos" in specials else None
    if bos is not None:
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [specials["bos"]], "tokens": [bos]}},
        }
    else:
        post = None
    ns = proto.normalizer_spec
    normalizers = []
    if ns.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if ns.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = pieces[specials["unk"]].piece if "unk" in specials else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": bool(proto.trainer_spec.byte_fallback),
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def write_hf_tokenizer(proto, out_dir: str | os.PathLike, add_tokens=(), model_bytes: bytes | None = None,
                       model_max_length: int | None = None) -> None:
    """Write tokenizer.model and the Hugging Face files for `proto` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model_bytes if model_bytes is not None else proto.SerializeToString())
    pad = pad_token_of(add_tokens)
    extra_special = list(add_tokens)
    tj = build_tokenizer_json(proto, extra_special)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    specials = _special_ids(proto)
    names = {k: proto.pieces[v].piece for k, v in specials.items()}
    if pad is not None:
        names["pad"] = pad
    stm = {f"{k}_token": names[k] for k in ("bos", "eos", "unk", "pad") if k in names}
    others = [t for t in add_tokens if t != pad]
    if others:
        stm["additional_special_tokens"] = others
    cfg = {
        # transformers 5's SentencePiece backend: AutoTokenizer encodes with sentencepiece itself, so
        # exactly as tokenizer.model does (a tokenizers-BPE tokenizer.json cannot express its
        # leftmost tie-break among equal scores, see the module doc); special_tokens_pattern "bos"
        # puts BOS first as LLaMA's tokenizer does. tokenizer.json stays for tools that read it alone.
        "tokenizer_class": "SentencePieceBackend",
        "special_tokens_pattern": "bos" if "bos" in names else "none",
        "add_bos_token": "bos" in names,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "padding_side": "left",
        "sp_model_kwargs": {},
        **stm,
    }
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(stm, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


def tokenizer_folder_model(folder: str | os.PathLike) -> Path:
    """The `tokenizer.model` inside a tokenizer folder, with a clear error when it is missing."""
    p = Path(folder)
    if p.is_file():
        return p
    m = p / "tokenizer.model"
    if not m.is_file():
        raise LlamaforgeError(
            "no tokenizer.model in this folder", p,
            "point to a folder holding the SentencePiece tokenizer.model (transformers 5's save_pretrained no "
            "longer writes it; copy it from the original release)",
        )
    return m


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Every file a tokenizer folder may hold (transformers 5 keeps the chat template in chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.model",) + TOKENIZER_JSON_FILES + ("chat_template.jinja", "chat_template.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """A folder holds a tokenizer when it has a SentencePiece tokenizer.model or a tokenizer.json
    (Llama-3 and Qwen2 ship only the latter)."""
    d = Path(folder)
    return (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file()


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The tokenizer files a folder holds, in TOKENIZER_FILES order."""
    d = Path(folder)
    return [d / f for f in TOKENIZER_FILES if (d / f).is_file()]


def check_tokenizer_json(folder: str | os.PathLike) -> None:
    """Each JSON file of a tokenizer folder that exists must be a JSON object (one clear error
    instead of a traceback from transformers or tokenizers)."""
    from .fsutil import read_json

    for name in TOKENIZER_JSON_FILES:
        p = Path(folder) / name
        if p.is_file():
            data = read_json(p, name)
            if not isinstance(data, dict):
                raise LlamaforgeError(f"{name} holds a JSON {type(data).__name__}, not an object", p,
                                      "restore it from the tokenizer's release, or rebuild the tokenizer")


def is_byte_level_bpe(tokenizer_json: Path) -> bool:
    """A GPT-2-style byte-level BPE tokenizer.json (Llama-3, Qwen2, SmolLM2): a BPE model without
    byte fallback and a ByteLevel decoder -- not a SentencePiece-style BPE (byte_fallback, Metaspace),
    which only its tokenizer.model describes exactly."""
    from .fsutil import read_json

    data = read_json(tokenizer_json, "tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    decoder = data.get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder]) if isinstance(d, dict)]
    return "ByteLevel" in kinds


def tokenizer_length(folder: Path) -> int:
    """Tokens of a tokenizer folder without importing transformers: its SentencePiece pieces, or
    more when tokenizer.json or added_tokens.json give ids beyond them."""
    from .fsutil import read_json

    folder = Path(folder)
    check_tokenizer_json(folder)
    if not has_tokenizer(folder):
        raise LlamaforgeError("no tokenizer in this folder (tokenizer.model or tokenizer.json)", folder,
                              "point to a tokenizer folder (tokenizer: in config.yaml, or --tokenizer), e.g. the base "
                              "model's folder or tokenizers/NAME")
    ids = [-1]
    if (folder / "tokenizer.model").is_file():
        ids.append(len(load_proto(folder / "tokenizer.model", "tokenizer.model").pieces) - 1)
    tj = folder / "tokenizer.json"
    try:
        if tj.is_file():
            data = read_json(tj, "tokenizer.json")
            ids += [int(t["id"]) for t in data.get("added_tokens", [])]
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: piece -> id
                ids += [int(i) for i in vocab.values()]
            elif isinstance(vocab, list):  # Unigram: [piece, score] by id
                ids.append(len(vocab) - 1)
        at = folder / "added_tokens.json"
        if at.is_file():
            ids += [int(i) for i in read_json(at, "added_tokens.json").values()]
        tc = folder / "tokenizer_config.json"
        if tc.is_file():  # transformers gives these ids tokens too (checked by check_tokenizer)
            ids += [int(i) for i in (read_json(tc, "tokenizer_config.json").get("added_tokens_decoder") or {})]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise LlamaforgeError("the tokenizer's token ids are malformed (an id that is not a number, or an added "
                              "token without one)", folder, "restore the tokenizer files from its release") from None
    if max(ids) < 0:
        raise LlamaforgeError("tokenizer.json holds no vocabulary (model.vocab)", tj,
                              "restore the tokenizer files from its release")
    return max(ids) + 1


_REPAIR = "restore the tokenizer files from its release, or rebuild them with scripts/merge_tokenizers.py"


def chat_templates(folder: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """(the default chat template, {name: template} of the other named ones, sorted by name) of a
    tokenizer folder, as transformers reads them: tokenizer_config.json's chat_template (a string, or
    a list of {"name", "template"}), else chat_template.jinja (+ additional_chat_templates/*.jinja),
    else chat_template.json. A list without a "default" entry is an error: transformers then refuses
    to pick one, and any pick (or none: Alpaca) would be a guess."""
    from .fsutil import read_json, read_text

    folder = Path(folder)
    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
    where = tc_path
    if isinstance(tc, dict) and "chat_template" in tc:
        value = tc["chat_template"]
    elif (folder / "chat_template.jinja").is_file():
        where = folder / "chat_template.jinja"
        value = read_text(where, "chat_template.jinja")
        extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        if extra:
            value = [{"name": "default", "template": value}] + [
                {"name": p.stem, "template": read_text(p, p.name)} for p in extra]
    elif (folder / "chat_template.json").is_file():
        where = folder / "chat_template.json"
        data = read_json(where, "chat_template.json")
        value = data.get("chat_template") if isinstance(data, dict) else data
    else:
        return None, {}
    if value is None or isinstance(value, str):
        return value, {}
    fix = 'give chat_template as one string, or as a list of {"name": ..., "template": ...} with one named "default"'
    if not isinstance(value, list):
        raise LlamaforgeError(f"chat_template is a JSON {type(value).__name__}, not a string or a list of named "
                              "templates", where, fix)
    named: dict[str, str] = {}
    for n, entry in enumerate(value):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]
                and isinstance(entry.get("template"), str)):
            raise LlamaforgeError(f"chat_template entry {n} is {json.dumps(entry)[:60]}, not an object with a "
                                  "\"name\" and a \"template\" string", where, fix)
        if entry["name"] in named:
            raise LlamaforgeError(f"chat_template names {entry['name']!r} twice", where, fix)
        named[entry["name"]] = entry["template"]
    keys: dict[str, str] = {}
    for name in named:
        key = "".join(c if c.isascii() and c.isalnum() else "_" for c in name)  # gguf_vocab.gguf_template_key
        if key in keys:
            raise LlamaforgeError(f"chat_template names {keys[key]!r} and {name!r} are one name in a GGUF ({key!r})",
                                  where, "give the templates names that differ in their letters and digits")
        keys[key] = name
    if "default" not in named:
        raise LlamaforgeError(f"chat_template lists templates named {', '.join(sorted(named)) or 'none'} but none named "
                              "'default', so no tool knows which to use", where,
                              "name the template the model is to use 'default'")
    default = named.pop("default")
    return default, dict(sorted(named.items()))


def check_tokenizer(folder: str | os.PathLike, rows: int | None = None) -> int:
    """The one check of a tokenizer folder, made by every command that reads one (the merge's
    --tokenizer, the exports, inference), so a tokenizer the later steps would refuse is refused at
    the first: its JSON files are objects, tokenizer.json loads in the tokenizers library (its
    merges, vocabulary and post-processor), tokenizer_config.json's added_tokens_decoder maps token
    ids to token objects, its chat templates are readable (chat_templates), and with `rows` no token
    id lies past the model's embedding rows. Returns the tokenizer's length (tokenizer_length)."""
    folder = Path(folder)
    check_tokenizer_json(folder)
    _check_added_tokens_decoder(folder)
    n = tokenizer_length(folder)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(os.fspath(tj))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            raise LlamaforgeError(f"tokenizer.json cannot be loaded by the tokenizers library ({msg[:160]})", tj,
                                  _REPAIR) from None
    chat_templates(folder)
    if rows is not None and n > rows:
        raise LlamaforgeError(f"the tokenizer has {n} tokens (ids up to {n - 1}) but the model has {rows} embedding "
                              "rows", folder, "use the tokenizer the model was trained or merged with")
    return n


def _check_added_tokens_decoder(folder: Path) -> None:
    """tokenizer_config.json's added_tokens_decoder: token ids (digits) to objects with a "content" string."""
    from .fsutil import read_json

    tc_path = folder / "tokenizer_config.json"
    if tc_path.is_file():
        tc = read_json(tc_path, "tokenizer_config.json")
        decoder = tc.get("added_tokens_decoder")
        if decoder is not None and not isinstance(decoder, dict):
            raise LlamaforgeError(f"added_tokens_decoder is a JSON {type(decoder).__name__}, not an object of token "
                                  "ids", tc_path, _REPAIR)
        for key, value in (decoder or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise LlamaforgeError(f"added_tokens_decoder has the key {key!r}, which is no token id", tc_path,
                                      _REPAIR)
            if not isinstance(value, dict) or not isinstance(value.get("content"), str):
                raise LlamaforgeError(f"added_tokens_decoder[{key}] is {json.dumps(value)[:60]}, not a token object "
                                      'with a "content" string', tc_path, _REPAIR)


def ships_padding(folder: str | os.PathLike | None, rows: int) -> bool:
    """Whether a model folder's own tokenizer is shorter than its embedding rows: the release pads
    its embeddings (Qwen2: 151936 rows for 151665 tokens), so a tokenizer up to `rows` fits it."""
    if folder is None or not Path(folder).is_dir() or not has_tokenizer(folder):
        return False
    try:
        return tokenizer_length(Path(folder)) < rows
    except LlamaforgeError:
        return False


def load_hf_tokenizer(folder: str | os.PathLike):
    """AutoTokenizer for a folder, never trusting remote code."""
    from transformers import AutoTokenizer

    check_tokenizer(folder)
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LlamaforgeError(f"cannot load the tokenizer: {msg[:200]}", folder,
                              "restore the tokenizer files, or rebuild them with scripts/merge_tokenizers.py") from None
    if hasattr(tok, "sp_model"):
        exact_sentencepiece_decode(tok)
    return tok


def exact_sentencepiece_decode(tok):
    """Decode as sentencepiece does: transformers 5.24's SentencePieceBackend joins the pieces as
    text, so byte-fallback pieces come out as "<0x0A>" and edge spaces are stripped; sentencepiece's
    own decode_pieces turns them back into the bytes and keeps the spaces."""
    import types

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(list(tokens))

    tok.convert_tokens_to_string = types.MethodType(convert_tokens_to_string, tok)
    return tok


def check_hf_tokenizer(folder: str | os.PathLike, samples=(TEST_SENTENCE,)) -> dict:
    """Load `folder` with AutoTokenizer and compare it with SentencePiece; raise when it is broken.

    Guards against the silent failures of transformers 5 (a 3-token tokenizer, a missing BOS).
    Returns the share of sample lines segmented identically.
    """
    import sentencepiece as spm

    folder = Path(folder)
    sp = spm.SentencePieceProcessor(model_file=os.fspath(folder / "tokenizer.model"))
    tok = load_hf_tokenizer(folder)
    n = sp.get_piece_size()
    fix = "rebuild it with scripts/merge_tokenizers.py, which writes tokenizer.json beside tokenizer.model"
    if len(tok) != n:
        raise LlamaforgeError(f"Hugging Face tokenizer has {len(tok)} tokens but tokenizer.model has {n}", folder, fix)
    bos = sp.bos_id()
    same = total = 0
    for line in samples:
        for text in (s for s in line.splitlines() if s.strip()):
            total += 1
            ids = tok(text).input_ids
            if bos >= 0:
                if not ids or ids[0] != bos:
                    raise LlamaforgeError(f"Hugging Face tokenizer does not put BOS id {bos} first", folder, fix)
                ids = ids[1:]
            same += ids == sp.encode(text)
    if bos >= 0 and tok.bos_token_id != bos:
        raise LlamaforgeError(f"bos_token_id is {tok.bos_token_id}, SentencePiece says {bos}", folder, fix)
    if sp.eos_id() >= 0 and tok.eos_token_id != sp.eos_id():
        raise LlamaforgeError(f"eos_token_id is {tok.eos_token_id}, SentencePiece says {sp.eos_id()}", folder, fix)
    if sp.unk_id() >= 0 and tok.unk_token_id != sp.unk_id():
        raise LlamaforgeError(f"unk_token_id is {tok.unk_token_id}, SentencePiece says {sp.unk_id()}", folder, fix)
    return {"lines": total, "identical": same, "agreement": same / total if total else 1.0}


def bundled_text(name: str) -> str:
    return resources.files("llamaforge").joinpath("data", name).read_text(encoding="utf-8")


def tokens_per_char(sp, text: str) -> float:
    chars = sum(len(line) for line in text.splitlines())
    toks = sum(len(sp.encode(line)) for line in text.splitlines())
    return toks / chars if chars else 0.0


def merge_tokenizers(base: str | os.PathLike, extra: str | os.PathLike | None, output: str | os.PathLike,
                     add_tokens=(), echo=print) -> dict:
    """Merge `extra` into `base`, write `output/` atomically, print the original script's report.

    Returns a summary dict (also written as `output/merge_report.json`).
    """
    import sentencepiece as spm

    if Path(base).is_dir() or Path(base).name == "tokenizer.json":
        if extra is not None:
            raise LlamaforgeError("an extra SentencePiece model cannot be merged into a tokenizer.json tokenizer", extra,
                                  "drop extra: (--extra) and list the new tokens under add_tokens: (--add-token)")
        return add_tokens_json(base, output, add_tokens, echo)
    if extra is None and not add_tokens:
        raise LlamaforgeError("nothing to merge: no extra SentencePiece model and no token to add", base,
                              "set extra: (--extra) and/or add_tokens: (--add-token) in config.yaml")
    guard_output(output, "tokenizer", [("base SentencePiece model", base), ("extra SentencePiece model", extra)])
    base_path = Path(base)
    base_proto = load_proto(base_path, "base SentencePiece model")
    if extra is None:  # only tokens added (e.g. [PAD] to LLaMA's own model)
        extra_path, extra_proto = None, _pb2().ModelProto()
    else:
        extra_path = Path(extra)
        extra_proto = load_proto(extra_path, "extra SentencePiece model")
    merged, res = merge_protos(base_proto, extra_proto, list(add_tokens), base_path, extra_path)
    base_sp = spm.SentencePieceProcessor(model_proto=base_path.read_bytes())

    echo(f"base: {base_path} ({res.base_pieces} pieces), extra: {extra_path} ({res.extra_pieces} pieces)")
    echo(f"Before: {res.base_pieces}")
    if extra_path is None:
        pass  # tokens only
    elif not res.added:
        log.warning("%s adds no piece that %s lacks; the output equals the base", extra_path, base_path)
        echo(f"WARNING: {extra_path} adds no new piece; the merged vocabulary equals the base")
    else:
        shown = " ".join(res.added[:20]) + (" ..." if len(res.added) > 20 else "")
        echo(f"Added {len(res.added)} pieces from the extra model: {shown}")
    for t in res.added_tokens:
        echo(f"Added token {t!r} with id {res.merged_pieces - len(res.added_tokens) + res.added_tokens.index(t)}")
    echo(f"New model pieces: {res.merged_pieces}")

    unchanged = not res.added and not res.added_tokens
    model_bytes = base_path.read_bytes() if unchanged else merged.SerializeToString()
    merged_sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    chinese = bundled_text("chinese.txt")
    summary = {
        "llamaforge": "merge_tokenizers",
        "base": os.fspath(base_path),
        "extra": None if extra_path is None else os.fspath(extra_path),
        "base_pieces": res.base_pieces,
        "extra_pieces": res.extra_pieces,
        "added_pieces": len(res.added),
        "added_tokens": res.added_tokens,
        "merged_pieces": res.merged_pieces,
        "test_sentence_tokens": {"base": len(base_sp.encode(TEST_SENTENCE)),
                                 "merged": len(merged_sp.encode(TEST_SENTENCE))},
        "chinese_tokens_per_char": {"base": round(tokens_per_char(base_sp, chinese), 4),
                                    "merged": round(tokens_per_char(merged_sp, chinese), 4)},
    }
    echo(f"Test text:\n{TEST_SENTENCE}")
    echo(f"Tokenized by the base tokenizer ({summary['test_sentence_tokens']['base']} pieces): "
         f"{base_sp.encode(TEST_SENTENCE, out_type=str)}")
    echo(f"Tokenized by the merged tokenizer ({summary['test_sentence_tokens']['merged']} pieces): "
         f"{merged_sp.encode(TEST_SENTENCE, out_type=str)}")
    cpt = summary["chinese_tokens_per_char"]
    echo(f"Tokens per character on the bundled Chinese sample: before {cpt['base']:.3f}, after {cpt['merged']:.3f}")

    with atomic_dir(output) as tmp:
        write_hf_tokenizer(merged, tmp, res.added_tokens, model_bytes=model_bytes)
        check = check_hf_tokenizer(tmp, samples=(TEST_SENTENCE, chinese, bundled_text("english.txt")))
        summary["hf_agreement"] = check
        echo(f"Hugging Face tokenizer: {res.merged_pieces} tokens, BOS first, identical to SentencePiece on "
             f"{check['identical']}/{check['lines']} sample lines")
        with open(tmp / "merge_report.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return summary


# ---------------------------------------------------------------------------------------------
# tokenizer.json tokenizers (Llama-3, Qwen2, ...): tokens added, everything else byte for byte


def _added_token(content: str, id_: int) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def add_tokens_json(base: str | os.PathLike, output: str | os.PathLike, add_tokens=(), echo=print) -> dict:
    """A tokenizer.json tokenizer folder with `add_tokens` appended as special added tokens (ids
    from the tokenizer's length on), written atomically to `output`. The other files are copied
    byte for byte; tokenizer_config.json gains the tokens in added_tokens_decoder (and the first
    token named like "pad" as pad_token when it has none)."""
    from .fsutil import read_json

    base = Path(base)
    folder = base.parent if base.is_file() else base
    guard_output(output, "tokenizer", [("base tokenizer", folder)])
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise LlamaforgeError("no tokenizer.json in the base tokenizer folder", folder,
                              "point base: at a tokenizer.json tokenizer folder, or at a SentencePiece tokenizer.model")
    n = tokenizer_length(folder)
    tj = read_json(tj_path, "tokenizer.json")
    vocab = (tj.get("model") or {}).get("vocab")
    present = set(vocab) if isinstance(vocab, dict) else {p[0] for p in vocab or [] if isinstance(p, list) and p}
    present |= {t.get("content") for t in tj.get("added_tokens", []) if isinstance(t, dict)}
    seen: set[str] = set()
    for tok in add_tokens:
        if tok in present or tok in seen:
            raise LlamaforgeError(f"--add-token {tok!r} is already a token of the tokenizer", tj_path,
                                  f"drop --add-token {tok!r} (or add_tokens in config.yaml); it would be a duplicate")
        seen.add(tok)
    added = [_added_token(t, n + i) for i, t in enumerate(add_tokens)]
    tj.setdefault("added_tokens", []).extend(added)
    cfg_path = folder / "tokenizer_config.json"
    cfg = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
    decoder = cfg.setdefault("added_tokens_decoder", {})
    for a in added:
        decoder[str(a["id"])] = {k: v for k, v in a.items() if k != "id"}
    pad = pad_token_of(add_tokens)
    if pad and not cfg.get("pad_token"):
        cfg["pad_token"] = pad
    for a in added:
        echo(f"Added token {a['content']!r} with id {a['id']}")
    echo(f"New vocabulary: {n} -> {n + len(added)} tokens")
    summary = {"llamaforge": "merge_tokenizers", "base": os.fspath(folder), "base_tokens": n,
               "added_tokens": list(add_tokens), "merged_tokens": n + len(added)}
    with atomic_dir(output) as tmp:
        for f in tokenizer_files(folder):
            if f.name not in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(f, tmp / f.name)
        for name, data in (("tokenizer.json", tj), ("tokenizer_config.json", cfg)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
                f.write("\n")
        tok = load_hf_tokenizer(tmp)
        if len(tok) != n + len(added) or any(tok.convert_tokens_to_ids(t) != n + i for i, t in enumerate(add_tokens)):
            raise LlamaforgeError(f"the extended tokenizer loads with {len(tok)} tokens, not {n + len(added)}",
                                  tj_path, "check the tokenizer's added_tokens for gaps in the ids")
        with open(tmp / "merge_report.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
            f.write("\n")
    return summary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, by which byte-level BPE vocabularies spell bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_model(tokenizer_json: Path) -> bytes:
    """Meta's Llama-3 tokenizer.model from a byte-level BPE tokenizer.json: one "base64(token bytes)
    rank" line per BPE token, by id (its special tokens live in Meta's code, not in the file)."""
    import base64

    from .fsutil import read_json

    data = read_json(tokenizer_json, "tokenizer.json")
    vocab = data["model"]["vocab"]
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token in special:
            continue
        try:
            raw = bytes(decode[c] for c in token)
        except KeyError:
            raise LlamaforgeError(f"token {token!r} is not a byte-level BPE token", tokenizer_json,
                                  "export a model with a byte-level BPE tokenizer (Llama-3's)") from None
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    return "".join(lines).encode()


# ---- Meta's Llama-3 tokenizer.model (tiktoken) -> tokenizer.json --------------------------------

# Meta's Llama-3.1/3.2 special tokens, after the 128000 BPE ranks (llama-models' tokenizer.py)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 11 + 2)]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def is_tiktoken_model(path: Path) -> bool:
    """Meta's Llama-3 tokenizer.model: text lines "base64 rank", not a SentencePiece protobuf."""
    import re

    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0]
    # saved by an editor: a UTF-8 byte order mark, CRLF line ends (read alike by _tiktoken_ranks)
    return bool(re.fullmatch(rb"(\xef\xbb\xbf)?[A-Za-z0-9+/=]+ \d+\r?", first))


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    import base64
    import binascii

    ranks = {}
    try:
        data = path.read_bytes()
        data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        for n, line in enumerate(data.splitlines()):  # noqa: B007 (n names the bad line)
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
        raise LlamaforgeError(f"line {n + 1} is not 'base64 rank'", path,
                              "use the tokenizer.model of Meta's Llama-3 release") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamaforgeError("the ranks are not 0 .. N-1", path, "use the tokenizer.model of Meta's Llama-3 release")
    return ranks


def _merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of a tiktoken rank table, as Meta's Llama-3 tokenizer.json lists them (transformers'
    TikTokenConverter): every split of a token into two tokens, by the token's rank, then by the
    halves' ranks."""
    merges = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return [(a, b) for a, b, _ in merges]


def llama3_tokenizer_json(path: Path, rows: int) -> dict:
    """A Hugging Face tokenizer.json for Meta's Llama-3 tokenizer.model: its ranks as a byte-level BPE
    (merges recovered from the ranks, ignore_merges as Meta's tokenizer.json has it), Llama-3's split
    pattern, the special tokens of llama-models after the ranks, BOS put in front."""
    ranks = _tiktoken_ranks(path)
    n = len(ranks)
    if n + len(LLAMA3_SPECIAL_TOKENS) != rows:
        raise LlamaforgeError(
            f"tokenizer.model has {n} ranks + {len(LLAMA3_SPECIAL_TOKENS)} special tokens, but the embeddings have "
            f"{rows} rows", path, "use the tokenizer.model released with these weights")
    spell = _bytes_to_unicode()
    text = {tok: "".join(spell[b] for b in tok) for tok in ranks}
    vocab = {text[tok]: r for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    merges = [[text[a], text[b]] for a, b in _merges_of(ranks)]
    added = [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)]
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def write_llama3_tokenizer(tj: dict, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json (from llama3_tokenizer_json) + tokenizer_config.json for a Llama-3 import."""
    out = Path(out_dir)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
           "model_input_names": ["input_ids", "attention_mask"], "model_max_length": int(model_max_length)}
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
