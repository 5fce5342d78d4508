"""Evaluation outputs: perplexity, merge equivalence, tokenizer statistics, per-model summary, plots,
and the llama.cpp quality of GGUF exports. One concern per module:

common
    What several share: the result kinds, DEFAULT_TOLERANCE, the output guard, the evaluation text.
ppl
    Sliding-window perplexity and bits per character.
equiv
    The merged model against base + adapters unmerged (max |delta logit| within tolerance + 2 x the
    rounding floor of the merged files' dtype).
token_stats
    Characters per token of the base and the merged tokenizer, overall and by script.
report
    The per-model summary.json and the matplotlib plots (summaries and GGUF quality).
gguf_eval
    The quality of each GGUF export, measured with llama.cpp itself.
mc
    Multiple-choice accuracy (C-Eval, CMMLU, MMLU-like JSONL) of a model or a GGUF export, by
    lm-evaluation-harness's loglikelihood and Chinese-LLaMA-Alpaca's first-token scoring.

Heavy libraries (torch, transformers, matplotlib, llama_cpp) are imported inside the functions that
use them: importing this package imports none of them.
"""

from .common import DEFAULT_TOLERANCE, EQUIVALENCE, GGUF_QUALITY, PERPLEXITY, SUMMARY, TOKENIZER_STATS
from .equiv import equivalence, equivalence_prompts, stored_dtypes
from .gguf_eval import gguf_quality
from .ppl import perplexity, sliding_window_nll
from .report import plot, plot_gguf_quality, summarize
from .token_stats import tokenizer_stats

__all__ = [
    "DEFAULT_TOLERANCE", "EQUIVALENCE", "GGUF_QUALITY", "PERPLEXITY", "SUMMARY", "TOKENIZER_STATS",
    "equivalence", "equivalence_prompts", "gguf_quality", "perplexity", "plot", "plot_gguf_quality",
    "sliding_window_nll", "stored_dtypes", "summarize", "tokenizer_stats",
]
