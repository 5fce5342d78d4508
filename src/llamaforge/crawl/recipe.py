"""The request recipe: the prompt of request i, a pure function of (seed, i, items per request).

The recipe is Chinese-LLaMA-Alpaca's `crawl_prompt.py` (a Chinese prompt naming 10 sampled
topics and 10 sampled task types, with randomized length limits), read from the bundled
crawl_prompt.json, so a resumed run asks exactly the prompts that were never answered.
"""

from __future__ import annotations

import functools
import json
import random
from typing import Any

from ..tokenizer import bundled_text


@functools.lru_cache(maxsize=1)
def _recipe() -> dict[str, Any]:
    return json.loads(bundled_text("crawl_prompt.json"))


def build_prompt(seed: int, index: int, items_per_request: int = 20) -> str:
    """The prompt of request `index`: a pure function of (seed, index, items_per_request)."""
    recipe = _recipe()
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and
    # Python versions (unlike hash()).
    rng = random.Random(f"llamaforge-crawl:{seed}:{index}")
    topics = "、".join(rng.sample(recipe["topics"], recipe["num_topics"]))
    tasks = "、".join(rng.sample(recipe["tasks"], recipe["num_tasks"]))
    input_limit = rng.randint(*recipe["input_limit"])
    output_limit = rng.randint(*recipe["output_limit"])
    return "\n".join(recipe["template"]).format(
        topics=topics, tasks=tasks, input_limit=input_limit, output_limit=output_limit, n=items_per_request
    )
