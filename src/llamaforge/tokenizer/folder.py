"""A tokenizer folder: which files it may hold, where its tokenizer.model is, its length, its chat
templates, and the one check (`check_tokenizer`) every command makes of it -- all without transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LlamaforgeError
from .proto import load_proto

HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
    from ..files.reading import read_json

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
    from ..files.reading import read_json

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
    from ..files.reading import read_json

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
    from ..files.reading import read_json, read_text

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

            from ..files.hashing import metadata_bytes

            Tokenizer.from_str(metadata_bytes(tj).decode("utf-8"))
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
    from ..files.reading import read_json

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


VOCAB_EXPLAINED = (
    "LLaMA's vocabulary has 32000 tokens, Chinese-LLaMA's 49953 and Chinese-Alpaca's 49954 (+[PAD]); "
    "the rows for the added tokens come only from an adapter that stores full embed_tokens and lm_head "
    "(Chinese-LLaMA-Plus-LoRA, then Chinese-Alpaca-Plus-LoRA)"
)


def check_tokenizer_fits(tok_len: int, chain: list[int], extended: bool, tokenizer_path, base=None) -> bool:
    """The one vocabulary-chain check of a tokenizer against a model's embedding rows, made by the
    merge and by inference alike: `chain` = the rows of the base, then after each adapter; `extended`
    = an adapter stores full embeddings. The tokenizer must have as many tokens as the last rows,
    except embeddings the base ships padded past its tokenizer (Qwen2: 151936 rows, 151665 tokens)
    when no adapter changed their number (an adapter that trains them in full, modules_to_save, keeps
    the padding). Returns whether the rows are such padding."""
    base_rows, rows = chain[0], chain[-1]
    padded = tok_len < rows and set(chain) == {base_rows} and base is not None and ships_padding(base, base_rows)
    if tok_len == rows or padded:
        return padded
    if not extended and tok_len > base_rows:
        raise LlamaforgeError(
            f"the tokenizer has {tok_len} tokens but the model has {base_rows} embedding rows and no adapter stores "
            f"full embeddings (embed_tokens/lm_head) that would add rows for the others. {VOCAB_EXPLAINED}",
            tokenizer_path, "add the adapter that extends the vocabulary (first in the list), or use the base's own "
            "tokenizer")
    steps = " -> ".join(str(n) for n in chain)
    raise LlamaforgeError(
        f"the tokenizer has {tok_len} tokens but the model has {rows} embedding rows after its adapters ({steps}). "
        f"{VOCAB_EXPLAINED}", tokenizer_path,
        "use the tokenizer shipped with the last adapter (tokenizer: in config.yaml, or --tokenizer), and check the "
        "adapter order" + ("" if base is None else f"; base: {base}"))

