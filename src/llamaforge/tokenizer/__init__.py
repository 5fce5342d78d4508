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

The package, one concern a module (every name is re-exported here, so `from llamaforge.tokenizer
import X` keeps working):

  proto     the SentencePiece model proto: load_proto, piece types, special_ids
  merge     merging SentencePiece models, or adding tokens to a tokenizer.json tokenizer
  hf_json   tokenizer.json + tokenizer_config.json + special_tokens_map.json for a SentencePiece model
  folder    the files of a tokenizer folder, its length, chat templates and check_tokenizer
  load      loading with transformers (load_hf_tokenizer) and probing against SentencePiece
  tiktoken  Meta's Llama-3 tokenizer.model (tiktoken) <-> byte-level BPE tokenizer.json
  texts     the bundled texts and the merge script's test sentence

Only the standard library and this package are imported here; transformers, tokenizers and
sentencepiece are imported inside the functions that use them.
"""

from __future__ import annotations

from .folder import (
    _REPAIR,
    VOCAB_EXPLAINED,
    check_tokenizer_fits,
    HF_FILES,
    TOKENIZER_FILES,
    TOKENIZER_JSON_FILES,
    _check_added_tokens_decoder,
    chat_templates,
    check_tokenizer,
    check_tokenizer_json,
    has_tokenizer,
    is_byte_level_bpe,
    ships_padding,
    tokenizer_files,
    tokenizer_folder_model,
    tokenizer_length,
)
from .hf_json import build_tokenizer_json, pad_token_of, write_hf_tokenizer
from .load import FastTokenizer, check_hf_tokenizer, exact_sentencepiece_decode, load_hf_tokenizer, tokens_per_char
from .merge import MergeResult, _added_token, add_tokens_json, merge_protos, merge_tokenizers
from .proto import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, _pb2, _special_ids, load_proto, special_ids
from .texts import TEST_SENTENCE, bundled_text
from .tiktoken import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    _bytes_to_unicode,
    _merges_of,
    _tiktoken_ranks,
    is_tiktoken_model,
    llama3_tokenizer_json,
    tiktoken_model,
    write_llama3_tokenizer,
)

__all__ = [
    "FastTokenizer",
    # proto
    "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE", "_pb2", "load_proto", "_special_ids",
    "special_ids",
    # merge
    "MergeResult", "merge_protos", "merge_tokenizers", "_added_token", "add_tokens_json",
    # hf_json
    "pad_token_of", "build_tokenizer_json", "write_hf_tokenizer",
    # folder
    "HF_FILES", "TOKENIZER_JSON_FILES", "TOKENIZER_FILES", "tokenizer_folder_model", "has_tokenizer",
    "tokenizer_files", "check_tokenizer_json", "is_byte_level_bpe", "tokenizer_length", "_REPAIR", "chat_templates",
    "check_tokenizer", "_check_added_tokens_decoder", "ships_padding", "check_tokenizer_fits", "VOCAB_EXPLAINED",
    # load
    "load_hf_tokenizer", "exact_sentencepiece_decode", "check_hf_tokenizer", "tokens_per_char",
    # tiktoken
    "_bytes_to_unicode", "tiktoken_model", "LLAMA3_SPECIAL_TOKENS", "LLAMA3_PATTERN", "is_tiktoken_model",
    "_tiktoken_ranks", "_merges_of", "llama3_tokenizer_json", "write_llama3_tokenizer",
    # texts
    "TEST_SENTENCE", "bundled_text",
]
