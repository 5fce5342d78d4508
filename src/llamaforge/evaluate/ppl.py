"""Perplexity: sliding-window perplexity (the Hugging Face recipe: windows of `max_length` tokens
moved by `stride`, each token scored once, with as much left context as its window gives), computed
exactly: every token after the first is predicted once, from the tokens before it in the first
window that reaches it (the recipe's `num_valid_tokens - 1` count is off by one for overlapping
windows; we count the tokens scored). Also bits per character, which compares models with
different tokenizers (perplexity per token does not)."""

from __future__ import annotations

import math
import os
from typing import Sequence

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import write_json
from .common import PERPLEXITY, _eval_text, _guard, log


def sliding_window_nll(model, ids: Sequence[int], max_length: int, stride: int, device: str = "cpu",
                       on_window=None) -> dict:
    """Summed negative log-likelihood (nats) of ids[1:], windows of `max_length` moved by `stride`.
    `on_window(first, end, logp)`, if given, sees the log-probabilities predicting ids[first:end].

    Window k covers ids[k*stride : k*stride + max_length] and scores the tokens no earlier window
    reached, each from the tokens before it inside the window. Without overlap (stride =
    max_length) the first token of each later window has no context and is not scored.
    """
    import torch

    if max_length < 2:
        raise LlamaforgeError(f"max_length is {max_length}", None, "give a window of at least 2 tokens")
    if not 1 <= stride <= max_length:
        raise LlamaforgeError(f"stride is {stride} with max_length {max_length}", None,
                              "give 1 <= stride <= max_length (stride = max_length: no overlap)")
    n = len(ids)
    if n < 2:
        raise LlamaforgeError("the text is one token long; nothing to score", None, "give a longer text")
    all_ids = torch.tensor(ids, dtype=torch.long)
    nll, count, windows = 0.0, 0, 0
    with torch.inference_mode():
        for begin, end, first in scored_windows(n, max_length, stride):
            window = all_ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=window).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            targets = torch.arange(first, end)
            rel = (targets - begin).to(device)
            picked = logp[rel - 1, all_ids[targets].to(device)]
            if on_window is not None:
                on_window(first, end, logp[rel - 1])
            nll -= float(picked.double().sum())
            count += len(targets)
            windows += 1
    return {"nll_sum": nll, "scored_tokens": count, "windows": windows}


def scored_windows(n: int, max_length: int, stride: int):
    """(begin, end, first scored position) of each window over n tokens that scores a token: the
    positions first..end-1 are predicted from the tokens before them inside ids[begin:end]. A
    window's first token has no context in it (stride = max_length), so it goes unscored, as in the
    Hugging Face recipe; token 0 (BOS) is never predicted."""
    prev_end = 1
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        if end > prev_end:
            yield begin, end, max(prev_end, begin + 1)
            prev_end = end
        if end == n:
            break


def perplexity(model: str | os.PathLike, text_file: str | os.PathLike | None = None,
               output: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
               max_length: int | None = None, stride: int = D.PERPLEXITY_STRIDE, device: str = "auto", dtype: str | None = "auto",
               echo=print) -> dict:
    """Perplexity of `model` on a UTF-8 text (the whole file as one sequence, BOS first; default:
    the bundled sample)."""
    from ..generate import load_model

    _guard(output, PERPLEXITY, [("model folder", model), ("text file", text_file), ("tokenizer folder", tokenizer)])
    text, text_name = _eval_text(text_file, "perplexity text")
    loaded = load_model(model, (), tokenizer, device, dtype, echo=echo)
    m, dev, dt, context = loaded.model, loaded.device, loaded.dtype, loaded.context_length
    ids = loaded.tokenizer(text.rstrip("\n")).input_ids
    window = int(max_length or context)
    if window > context:
        log.warning("max_length %d exceeds the model's context %d", window, context)
    stride = min(int(stride), window)
    echo(f"{model}: {len(ids)} tokens, window {window}, stride {stride}, {dt} on {dev}")
    r = sliding_window_nll(m, ids, window, stride, dev)
    chars = len(text.rstrip("\n"))
    mean = r["nll_sum"] / r["scored_tokens"]
    if not math.isfinite(mean):
        raise LlamaforgeError(f"the model's logits are not finite (mean negative log-likelihood {mean}): its perplexity "
                              "is undefined", model, "rebuild the model; check its weights and adapters for NaN or "
                              "infinite values (evaluate.py equivalence shows where they differ)")
    result = {
        "llamaforge": PERPLEXITY,
        "model": os.fspath(model),
        "tokenizer": loaded.sources["tokenizer"],
        "text": text_name,
        "characters": chars,
        "tokens": len(ids),
        "scored_tokens": r["scored_tokens"],
        "max_length": window,
        "stride": stride,
        "windows": r["windows"],
        "dtype": str(dt).replace("torch.", ""),
        "nll_sum": r["nll_sum"],
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_character": r["nll_sum"] / math.log(2) / chars,
    }
    echo(f"perplexity {result['perplexity']:.4f} ({result['bits_per_character']:.4f} bits per character) over "
         f"{r['scored_tokens']} tokens in {r['windows']} window(s)")
    if output:
        write_json(output, result)
    return result
