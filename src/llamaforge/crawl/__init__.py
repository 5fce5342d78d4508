"""Alpaca-format instruction data from any OpenAI-compatible chat API.

The recipe is Chinese-LLaMA-Alpaca's `crawl_prompt.py` (a Chinese prompt naming 10 sampled
topics and 10 sampled task types, with randomized length limits), made reproducible, concurrent
and resumable:

    prompt(seed, i) -> chat completion (own retry loop) -> tolerant parse -> validate
                    -> near-duplicate check (character ROUGE-L) -> append to F.jsonl

One concern a module: recipe (the prompts), client (requests, retries, redaction), replies
(parsing and checking items), dedup (ROUGE-L), store (the files on disk, resuming; its docstring
says what is written and how it survives a kill) and run (crawl(), the driver). This package
re-exports their public names.
"""

from .client import BACKOFF_CAP, MAX_RETRY_AFTER
from .dedup import DedupIndex, lcs_length, normalize_for_rouge, rouge_l
from .recipe import build_prompt
from .replies import (
    MAX_INPUT_CHARS,
    MAX_INSTRUCTION_CHARS,
    MAX_OUTPUT_CHARS,
    MIN_INSTRUCTION_CHARS,
    REJECT_REASONS,
    Item,
    check_item,
    parse_reply,
    storable,
)
from .run import CRAWL_STATS, DEFAULT_MODEL, MAX_REQUESTS, check_api_key, crawl
from .store import alpaca_of, output_paths

__all__ = [
    "BACKOFF_CAP", "CRAWL_STATS", "DEFAULT_MODEL", "DedupIndex", "Item", "MAX_INPUT_CHARS", "MAX_INSTRUCTION_CHARS",
    "MAX_OUTPUT_CHARS", "MAX_REQUESTS", "MAX_RETRY_AFTER", "MIN_INSTRUCTION_CHARS", "REJECT_REASONS", "alpaca_of",
    "build_prompt", "check_api_key", "check_item", "crawl", "lcs_length", "normalize_for_rouge", "output_paths",
    "parse_reply", "rouge_l", "storable",
]
