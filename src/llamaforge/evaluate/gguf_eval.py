"""The quality of each GGUF export, measured with llama.cpp itself: bits per weight, file size,
llama.cpp's perplexity and its agreement with the Hugging Face model (top-1, mean KL)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import write_json
from ..model import ModelFolder
from .common import GGUF_QUALITY, _eval_text, _guard
from .equiv import _logits, equivalence_prompts
from .ppl import sliding_window_nll


class _LlamaCppLM:
    """A llama.cpp model that answers `model(input_ids=...)` with `.logits`, as a Hugging Face one
    does (so the perplexity windows are exactly those of the Hugging Face perplexity)."""

    def __init__(self, path, n_ctx: int, threads: int):
        from ..export.quantize import open_llama

        self.llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads or None)

    def __call__(self, input_ids):
        import types

        import torch

        ids = [int(i) for i in input_ids[0].tolist()]
        self.llm.reset()
        self.llm.eval(ids)
        return types.SimpleNamespace(logits=torch.tensor(self.llm.scores[: len(ids)], dtype=torch.float32)[None])

    def close(self):
        self.llm.close()


def _kl_top1(ref: Sequence, got: Sequence) -> tuple[float, float]:
    """Mean KL(ref || got) of the next-token distributions over every position, and top-1 agreement."""
    import torch

    kl, agree, n = 0.0, 0, 0
    for a, b in zip(ref, got):
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return kl / n, agree / n


def gguf_quality(model: str | os.PathLike, ggufs: Sequence[str | os.PathLike], output: str | os.PathLike,
                 text_file: str | os.PathLike | None = None, prompts_file: str | os.PathLike | None = None,
                 max_length: int | None = None, stride: int = D.PERPLEXITY_STRIDE, threads: int = 0,
                 echo=print) -> dict:
    """eval/{model}/gguf.json: per GGUF export, bits per weight, file size, llama.cpp's perplexity on
    the text (the windows of the Hugging Face perplexity), and its agreement with the Hugging Face
    model on the fixed prompts (top-1, mean KL divergence of the next-token distributions)."""
    import torch

    from ..export.quantize import bits_per_weight, fallbacks, tensor_types
    from ..generate import check_model_config, load_causal_lm, load_tokenizer

    inputs = [("model folder", model), ("text", text_file), ("prompts file", prompts_file)]
    inputs += [("GGUF file", g) for g in ggufs]
    _guard(output, GGUF_QUALITY, inputs)
    if not ggufs:
        raise LlamaforgeError("no GGUF file to measure", None, "give --gguf FILE (repeatable)")
    m = _check_ggufs(model, ggufs)  # the model folder described (and its tensors checked) once, reused below
    try:
        text, text_name = _eval_text(text_file, "text")
        check_model_config(m)
        tok = load_tokenizer(m.tokenizer.folder)
        ids = tok(text).input_ids
        prompts = [tok(p).input_ids for p in equivalence_prompts(prompts_file)]
        # the guarded loader (config.json checked, every weight file checked first: a hostile pickle is one clear
        # error), given the ModelFolder open_model made: the folder is not read again
        hf = load_causal_lm(m, torch.float32, "cpu")
    finally:
        m.close()
    window = int(max_length or getattr(hf.config, "max_position_embeddings", 2048))
    window = min(window, max(len(ids), 2))
    ref_nll = sliding_window_nll(hf, ids, window, min(stride, window))
    ref_logits = _logits(hf, prompts, "cpu")
    del hf
    n_ctx = max(window, max(len(p) for p in prompts))
    rows = []
    for g in ggufs:
        g = Path(g)
        bpw, nbytes, weights = bits_per_weight(g)
        try:
            lm = _LlamaCppLM(g, n_ctx, threads)
        except (ValueError, RuntimeError, OSError) as e:  # llama-cpp-python: "Failed to load model from file"
            raise LlamaforgeError(f"llama.cpp cannot load this GGUF ({str(e)[:120]}; its log is above)", g,
                                  f"export it again: scripts/export_gguf.py --model {model}") from None
        try:
            nll = sliding_window_nll(lm, ids, window, min(stride, window))
            got = [lm(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        finally:
            lm.close()
        kl, top1 = _kl_top1(ref_logits, got)
        if not (math.isfinite(nll["nll_sum"]) and math.isfinite(kl)):
            raise LlamaforgeError("llama.cpp's logits of this GGUF are not finite (NaN or infinity)", g,
                                  f"export it again from a sound model: scripts/export_gguf.py --model {model}")
        outtype = _outtype_of(g)
        types = sorted({t for t, _ in tensor_types(g).values()})
        row = {"file": g.name, "outtype": outtype, "size_bytes": g.stat().st_size, "bits_per_weight": bpw,
               "weights": weights, "types": types,
               "perplexity": math.exp(nll["nll_sum"] / nll["scored_tokens"]),
               "kl_mean": kl, "top1_agreement": top1, "fallbacks": len(fallbacks(g, outtype))}
        rows.append(row)
        echo(f"{g.name}: {bpw:.2f} bits/weight, perplexity {row['perplexity']:.4f}, KL {kl:.5f}, "
             f"top-1 {top1:.4f}")
    result = {
        "llamaforge": GGUF_QUALITY, "model": os.fspath(model), "text": text_name,
        "window": window, "stride": min(stride, window), "scored_tokens": ref_nll["scored_tokens"],
        "prompt_positions": sum(len(p) for p in prompts),
        "reference": {"what": "the Hugging Face model, float32", "perplexity":
                      math.exp(ref_nll["nll_sum"] / ref_nll["scored_tokens"])},
        "exports": rows,
    }
    write_json(output, result)
    return result


def _check_ggufs(model, ggufs) -> ModelFolder:
    """Each GGUF is a readable GGUF of `model` (its architecture, tensors and vocabulary; see
    export.check_gguf_of), checked before any model is loaded. Returns the model's ModelFolder
    (export.open_model's: tensors checked, index open; the caller closes it)."""
    from ..export.gguf_check import check_gguf_of, open_gguf
    from ..export.gguf_meta import load_gguf
    from ..export.source import open_model
    from ..files.reading import require_regular_file

    gguf = load_gguf()
    m = open_model(model)
    try:
        for g in ggufs:
            g = Path(g)
            fix = f"give a GGUF export of this model: scripts/export_gguf.py --model {model}"
            require_regular_file(g, "the GGUF file", fix)
            check_gguf_of(gguf, open_gguf(gguf, g, fix), g, m, fix, what="the GGUF")
    except BaseException:
        m.close()
        raise
    return m


def _outtype_of(path: Path) -> str:
    """The --outtype a GGUF was made as (its general.file_type, e.g. MOSTLY_Q4_K_M -> q4_k_m)."""
    import gguf

    from ..export.quantize import gguf_file_type

    ft = gguf_file_type(gguf.GGUFReader(path))
    try:
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type {ft}"
