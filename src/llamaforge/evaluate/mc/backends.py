"""The two models a multiple-choice evaluation scores: a Hugging Face folder (float32 on the CPU,
through the one loader) and a GGUF file (llama.cpp's own logits and tokenizer, one model load).

Each answers the same three questions: how a text tokenizes (`encode`, special tokens in the text
parsed, none added), whether a BOS goes first (`add_bos`), and `score(context_ids,
continuations)`: the log probabilities of each continuation's tokens after the context, with the
context run once and its KV cache reused for every continuation (the batched scoring), plus the
logits of the next token after the context (the first-token scoring)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Sequence

from ...errors import LlamaforgeError


# llama.cpp keeps the logits of every position of its context (n_ctx x vocabulary float32: 2 GB at 4096
# positions and Llama-3's 128256 tokens), so the context is the model's own up to this many positions
# (C-Eval's 5-shot prompts take well under 2048 tokens); a longer question is one clear error
GGUF_MAX_CONTEXT = 4096


def _context_of(path: Path) -> int:
    """The GGUF's training context ({arch}.context_length), at most GGUF_MAX_CONTEXT."""
    from ...export.quantize import header_scalars

    try:
        keys = header_scalars(path)
        arch = keys["general.architecture"].decode("utf-8")
        return min(int(keys[f"{arch}.context_length"]), GGUF_MAX_CONTEXT)
    except (KeyError, ValueError, TypeError, AttributeError):
        return GGUF_MAX_CONTEXT


class HFBackend:
    """A Hugging Face model folder, scored in float32 on the CPU."""

    def __init__(self, folder: str | os.PathLike, echo=print):
        import torch

        from ...generate import check_model_config, load_causal_lm, load_tokenizer

        m = check_model_config(folder)
        try:
            self.tok = load_tokenizer(m.tokenizer.folder)
            self.model = load_causal_lm(m, torch.float32, "cpu")
        finally:
            m.close()
        self.name = os.fspath(folder)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        ids = self.tok("a").input_ids
        bos = self.tok.bos_token_id
        self.bos_id = bos
        self.bos_text = self.tok.bos_token if bos is not None else None
        # the tokenizer's own default (LLaMA's adds BOS, GPT-2-style BPEs do not), as Chinese-LLaMA-Alpaca's
        # scripts tokenize their prompts and as llama.cpp does with the GGUF's add_bos_token
        self.add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
        self.chat_template = getattr(self.tok, "chat_template", None) or None
        # transformers 5.x renames forward's past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def score(self, context: Sequence[int], continuations: Sequence[Sequence[int]]):
        """The logliks of the continuations after the context: the context runs once, its KV cache is
        repeated for the continuations, which run as one right-padded batch (right padding: no real
        token sees a pad, so no attention mask is needed)."""
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([list(context)]), use_cache=True)
            last = out.logits[0, -1].float()
            first = torch.log_softmax(last, -1)
            logliks = [float(first[c[0]]) for c in continuations]
            longest = max(len(c) for c in continuations)
            if longest > 1:
                n = len(continuations)
                batch = torch.zeros((n, longest - 1), dtype=torch.long)
                for i, c in enumerate(continuations):
                    batch[i, : len(c) - 1] = torch.tensor(list(c[:-1]), dtype=torch.long)
                cache = getattr(out, "cache", None) or out.past_key_values
                cache.batch_repeat_interleave(n)
                logp = torch.log_softmax(self.model(batch, use_cache=False, **{self._cache_arg: cache}).logits.float(), -1)
                for i, c in enumerate(continuations):
                    logliks[i] += float(sum(logp[i, j - 1, c[j]] for j in range(1, len(c))))
        return logliks

    def next_logits(self, ids: Sequence[int]):
        """The logits of the token after `ids` (float32)."""
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([list(ids)])).logits[0, -1].float()

    def score_one(self, context: Sequence[int], continuation: Sequence[int]) -> float:
        """One continuation alone, the whole sequence in one forward (the harness's per-request
        computation; the benchmark's and the tests' reference for the batched `score`)."""
        import torch

        ids = list(context) + list(continuation)
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        n = len(context)
        return float(sum(logp[n - 1 + j, c] for j, c in enumerate(continuation)))

    def close(self):
        self.model = None


class GGUFBackend:
    """A GGUF file scored by llama.cpp (llama-cpp-python, logits of every position): its own
    tokenizer, its own add_bos_token, its own chat template. Loaded once; the KV cache keeps the
    longest prefix shared with the previous request (the k-shot prefix is evaluated once)."""

    def __init__(self, path: str | os.PathLike, threads: int = 0, echo=print):
        from ...export.quantize import open_llama
        from ...files.reading import require_regular_file

        p = require_regular_file(path, "the GGUF file", "give a GGUF export: scripts/export_gguf.py")
        try:
            self.llm = open_llama(p, n_ctx=_context_of(p), n_batch=512, logits_all=True, n_threads=threads or None)
        except (ValueError, RuntimeError, OSError) as e:
            raise LlamaforgeError(f"llama.cpp cannot load this GGUF ({str(e)[:120]})", p,
                                  "give a GGUF export: scripts/export_gguf.py") from None
        self.name = os.fspath(path)
        self.context_length = int(self.llm.n_ctx())
        model = self.llm._model
        bos = model.token_bos()
        self.bos_id = bos if bos >= 0 else None
        self.bos_text = model.token_get_text(bos) if bos >= 0 else None
        self.add_bos = bool(model.add_bos_token()) and self.bos_id is not None
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template") or None
        self.path = Path(p)

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else []

    def chat(self, messages: list[dict]) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos = self.llm._model.token_eos()
        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=self.llm._model.token_get_text(eos) if eos >= 0 else "",
                                  bos_token=self.bos_text or "", add_generation_prompt=True)
        return fmt(messages=messages).prompt

    def _eval(self, ids: list[int]) -> None:
        """The KV cache holds `ids` (and llm.scores their logits): only what differs from the tokens
        already cached is evaluated."""
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep
        if keep < len(ids):
            self.llm.eval(ids[keep:])

    def score(self, context: Sequence[int], continuations: Sequence[Sequence[int]]):
        import numpy as np
        import torch

        ctx = list(context)
        self._eval(ctx)
        last = torch.tensor(np.array(self.llm.scores[len(ctx) - 1], dtype=np.float32))
        first = torch.log_softmax(last, -1)
        logliks = []
        for c in continuations:
            total = float(first[c[0]])
            if len(c) > 1:
                self.llm.n_tokens = len(ctx)
                self.llm.eval(list(c[:-1]))
                rows = torch.tensor(np.array(self.llm.scores[len(ctx): len(ctx) + len(c) - 1], dtype=np.float32))
                logp = torch.log_softmax(rows, -1)
                total += float(sum(logp[j - 1, c[j]] for j in range(1, len(c))))
            logliks.append(total)
        return logliks

    def next_logits(self, ids: Sequence[int]):
        import numpy as np
        import torch

        self._eval(list(ids))
        return torch.tensor(np.array(self.llm.scores[len(ids) - 1], dtype=np.float32))

    def close(self):
        self.llm.close()
