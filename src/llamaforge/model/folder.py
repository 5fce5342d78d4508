"""`ModelFolder`: the one description of a Hugging Face model folder, built once per input.

Typed and read-only: config.json, the family (model/families.py), the dimensions and rope
settings, the tokenizer (its kind and files), and on first use the tokenizer's length, special
ids, chat templates, generation config and tensor index. The merge, the exports, the quantizer,
inference and evaluation take one; none reads config.json again or asks which of two tokenizer
paths is None. Every metadata file is read through `files.hashing.metadata_bytes`, so each is opened at
most once per process however many modules look at it (tests/test_metadata_reads.py counts them
with strace).

No torch here: building the description reads JSON only; the tensor index (`tensors()`) opens
the weight files' headers when a command needs them.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import LlamaforgeError
from ..files.reading import read_json, read_json_object, require_dir
from .dims import LlamaDims, dims_from_config, rope_settings
from .families import Family, family_of


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of a Hugging Face model folder; a Meta checkpoint or a bare folder gets the
    error users meet as "does not appear to have a file named config.json", with the fix."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        if not folder.is_dir():
            raise LlamaforgeError("model folder not found", folder, "check the path in config.yaml or on the command line")
        meta = any(folder.glob("consolidated.*.pth"))
        raise LlamaforgeError(
            "the folder has no config.json" + (" (it is a Meta checkpoint)" if meta else ""), folder,
            "give it as the model's base in config.yaml (the pipeline converts it) or run scripts/import_pth.py"
            if meta else "point to a Hugging Face model folder (config.json + weights)",
        )
    cfg = read_json(folder / "config.json", "config.json")
    if not isinstance(cfg, dict):
        raise LlamaforgeError(f"config.json holds a JSON {type(cfg).__name__}, not an object", folder / "config.json",
                              "restore the model's config.json (save_pretrained writes an object)")
    return cfg


class TokenizerKind(enum.Enum):
    SENTENCEPIECE = "sentencepiece"    # tokenizer.model holds the vocabulary (with or without Hugging Face files)
    BYTE_LEVEL_BPE = "byte-level BPE"  # tokenizer.json only, GPT-2 style (Llama-3, Qwen2, SmolLM2)
    JSON = "tokenizer.json"            # tokenizer.json only, of another kind (a SentencePiece-style BPE)
    NONE = "none"


@dataclass(frozen=True)
class Tokenizer:
    """A folder's tokenizer: its kind and files."""

    kind: TokenizerKind
    folder: Path
    model: Path | None  # tokenizer.model
    json: Path | None   # tokenizer.json

    @classmethod
    def of(cls, folder: Path) -> "Tokenizer":
        model, tj = folder / "tokenizer.model", folder / "tokenizer.json"
        model = model if model.is_file() else None
        tj = tj if tj.is_file() else None
        if model is not None:
            kind = TokenizerKind.SENTENCEPIECE
        elif tj is None:
            kind = TokenizerKind.NONE
        else:
            from ..tokenizer import is_byte_level_bpe

            kind = TokenizerKind.BYTE_LEVEL_BPE if is_byte_level_bpe(tj) else TokenizerKind.JSON
        return cls(kind, folder, model, tj)


@dataclass(frozen=True)
class Rope:
    theta: float
    type: str         # "default", "linear", "yarn", "llama3", ...
    parameters: dict  # rope_scaling and rope_parameters, merged
    swa_theta: float | None = None  # the sliding-window layers' own rope base (Gemma-3), else None


class ModelFolder:
    """A Hugging Face model folder, described once (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, what: str = "model folder"):
        self.path = require_dir(path, what)
        self.config_path = self.path / "config.json"
        self.config: dict = read_hf_config(self.path)
        self.family: Family = family_of(self.config, self.config_path)
        self.dims: LlamaDims = dims_from_config(self.config, self.config_path)
        try:
            self.rope = Rope(*rope_settings(self.config))
        except (TypeError, ValueError) as e:
            raise LlamaforgeError(f"config.json lacks or garbles {e}", self.config_path,
                                  "use the config.json written with the model") from None
        self._tensors = None

    def __repr__(self) -> str:
        return f"ModelFolder({os.fspath(self.path)!r}, {self.family.name}, tokenizer {self.tokenizer.kind.value})"

    @property
    def folder(self) -> Path:
        return self.path

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The folder's tokenizer, its kind decided on first use (a command given another tokenizer
        folder never reads this one's)."""
        return Tokenizer.of(self.path)

    @cached_property
    def generation_config(self) -> dict | None:
        p = self.path / "generation_config.json"
        return read_json_object(p, "generation_config.json") if p.is_file() else None

    @cached_property
    def vocab_length(self) -> int:
        """The tokenizer's length (tokenizer.check_tokenizer: the one check of a tokenizer folder)."""
        from ..tokenizer import check_tokenizer

        return check_tokenizer(self.path)

    @cached_property
    def chat_templates(self) -> tuple[str | None, dict[str, str]]:
        """(default, {name: template}) of the tokenizer files (tokenizer.chat_templates)."""
        from ..tokenizer import chat_templates

        return chat_templates(self.path)

    @cached_property
    def sentencepiece(self):
        """The SentencePiece model (tokenizer.model) parsed once, or None for another tokenizer."""
        from ..tokenizer import load_proto

        return load_proto(self.tokenizer.model, "tokenizer.model") if self.tokenizer.model is not None else None

    @cached_property
    def special_ids(self) -> dict[str, int]:
        """bos/eos/unk/pad ids of a SentencePiece tokenizer (tokenizer.model + special_tokens_map.json)."""
        from ..tokenizer import special_ids

        return {} if self.sentencepiece is None else special_ids(self.sentencepiece, self.path)

    def tensors(self):
        """The tensor index (formats.ModelSource: every weight file's header), opened on first use."""
        if self._tensors is None:
            from ..formats.source import ModelSource

            self._tensors = ModelSource(self.path)
        return self._tensors

    def close(self) -> None:
        if self._tensors is not None:
            self._tensors.close()
            self._tensors = None

    def __enter__(self) -> "ModelFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
