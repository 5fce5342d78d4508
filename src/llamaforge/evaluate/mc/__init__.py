"""Multiple-choice evaluation (C-Eval, CMMLU, MMLU-like JSONL) of a merged model and its GGUF exports.

data
    The three input formats, detected and checked row by row.
prompts
    Chinese-LLaMA-Alpaca's C-Eval/CMMLU prompts and MMLU's, k-shot, optionally through a chat template.
backends
    The Hugging Face model (float32, CPU) and the GGUF file (llama.cpp): tokenization and batched scoring.
run
    Both scorings (lm-evaluation-harness loglikelihood, Chinese-LLaMA-Alpaca's first token), the
    summary and the items file.
"""

from .data import load_questions
from .run import MULTIPLE_CHOICE, encode_pair, multiple_choice, predictions

__all__ = ["MULTIPLE_CHOICE", "encode_pair", "load_questions", "multiple_choice", "predictions"]
