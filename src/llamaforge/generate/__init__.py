"""Inference: instruction files, model + adapter loading, batched generation, REPL.

This is Chinese-LLaMA-Alpaca's `scripts/inference/inference_hf.py` as a library, with the same
generation settings and prompt template by default, and these differences:

* Generation is batched with left padding. Under greedy decoding a batch gives the same token
  ids as one prompt at a time: positions come from the attention mask (Hugging Face `generate`)
  and the repetition penalty ignores each row's padding (`PaddedRepetitionPenalty`), which the
  stock processor would count as a repeated token.
* Several adapters are applied in order, as the Chinese-Alpaca-Plus recipe wants (LLaMA ->
  LLaMA-Plus -> Alpaca-Plus): every adapter but the last is merged with PEFT (in the compute
  dtype: float32 on the CPU), the last stays a live PEFT adapter. The embedding is resized
  (without mean resizing) to each adapter's stored vocabulary first. The chain is checked
  before any weight is read: an
  Alpaca-Plus-style adapter (its vocabulary is the previous one + [PAD]) applied straight to a
  base that lacks the LLaMA-Plus vocabulary, a vocabulary that would shrink, or a tokenizer whose
  length is not the final embedding size each stop with one clear error.
* Instruction files may be plain text (one instruction a line) or Alpaca JSON / JSONL records
  (instruction + input); predictions are {instruction, input, prompt, output} records.
* `--chat` keeps a multi-turn history, dropping the oldest turns to stay within the context.

The package, one concern a module (the prompt formats are llamaforge.model.prompts', shared with the GGUF
chat template and the Ollama Modelfile):

* `instructions`: instruction files (Example, read_examples)
* `adapters`: adapter folders and the vocabulary chain (AdapterInfo, inspect_adapters, plan_vocab)
* `loading`: device, dtype, tokenizer, model + adapters (load_model, load_causal_lm, load_tokenizer)
* `generation`: settings, batched generation, the predictions file (GenerationSettings, Generator, predict)
* `chat`: the REPL and multi-turn chat (ChatSession, interactive)

Heavy imports (torch, transformers, peft) stay inside functions.
"""

from __future__ import annotations

from ..model.prompts import TEMPLATES, ChatTemplate, Template, bind_template, get_template
from .adapters import AdapterInfo, inspect_adapter, inspect_adapters, plan_vocab
from .chat import BANNER, CHAT_BANNER, ChatSession, interactive
from .generation import (
    ORIGINAL_GENERATION,
    PREDICT,
    Generated,
    GenerationSettings,
    Generator,
    _pad_id,
    _padded_penalty_class,
    predict,
)
from .instructions import SAMPLE_DATA, Example, _record, read_examples
from .loading import (
    Loaded,
    _dtype_kwarg,
    apply_adapters,
    base_vocab_size,
    check_model_config,
    default_tokenizer_dir,
    load_causal_lm,
    load_model,
    load_tokenizer,
    resize_embeddings,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "TEMPLATES", "ChatTemplate", "Template", "bind_template", "get_template",
    "AdapterInfo", "inspect_adapter", "inspect_adapters", "plan_vocab",
    "BANNER", "CHAT_BANNER", "ChatSession", "interactive",
    "ORIGINAL_GENERATION", "PREDICT", "Generated", "GenerationSettings", "Generator", "_pad_id",
    "_padded_penalty_class", "predict",
    "SAMPLE_DATA", "Example", "_record", "read_examples",
    "Loaded", "_dtype_kwarg", "apply_adapters", "base_vocab_size", "check_model_config", "default_tokenizer_dir",
    "load_causal_lm", "load_model", "load_tokenizer", "resize_embeddings", "resolve_device", "resolve_dtype",
]
