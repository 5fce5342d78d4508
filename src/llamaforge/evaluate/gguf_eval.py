"""The quality of each GGUF export, measured with llama.cpp itself: bits per weight, file size,
llama.cpp's perplexity, its agreement with the Hugging Face model (top-1, mean KL) and, given the
F16 GGUF, its mean KL from the F16 over the text; exports quantized with and without an importance
matrix side by side (the text must not be the calibration text)."""

from __future__ import annotations

import math
import os
import tempfile
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
                 echo=print, f16: str | os.PathLike | None = None, imatrix: str | os.PathLike | None = None) -> dict:
    """eval/{model}/gguf.json: per GGUF export, bits per weight, file size, llama.cpp's perplexity on
    the text (the windows of the Hugging Face perplexity), and its agreement with the Hugging Face
    model on the fixed prompts (top-1, mean KL divergence of the next-token distributions). `f16`:
    the model's F16 GGUF, from which each export's mean KL over the text's scored tokens is measured
    (kl_f16). `imatrix`: the importance matrix some exports were made with; the text must not be its
    calibration text (the gain would be measured where it can be faked)."""
    import torch

    from ..export.quantize import bits_per_weight, fallbacks, tensor_types
    from ..generate import check_model_config, load_causal_lm, load_tokenizer

    inputs = [("model folder", model), ("text", text_file), ("prompts file", prompts_file)]
    inputs += [("GGUF file", g) for g in ggufs] + [("F16 GGUF", f16), ("importance matrix", imatrix)]
    _guard(output, GGUF_QUALITY, inputs)
    if not ggufs:
        raise LlamaforgeError("no GGUF file to measure", None, "give --gguf FILE (repeatable)")
    if imatrix is not None:
        _check_not_calibration(text_file, imatrix)
    m = _check_ggufs(model, list(ggufs) + ([f16] if f16 is not None else []))  # the model folder described (and its tensors checked) once, reused below
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
    scratch = tempfile.TemporaryDirectory(prefix="llamaforge-kl-")
    ref = _reference_logprobs(f16, ids, window, min(stride, window), threads, scratch.name) if f16 else None
    for g in ggufs:
        g = Path(g)
        bpw, nbytes, weights = bits_per_weight(g)
        try:
            lm = _LlamaCppLM(g, n_ctx, threads)
        except (ValueError, RuntimeError, OSError) as e:  # llama-cpp-python: "Failed to load model from file"
            raise LlamaforgeError(f"llama.cpp cannot load this GGUF ({str(e)[:120]}; its log is above)", g,
                                  f"export it again: scripts/export_gguf.py --model {model}") from None
        try:
            same = f16 is not None and g.resolve() == Path(f16).resolve()
            kl_text = _KLFrom(ref) if ref is not None and not same else None
            nll = sliding_window_nll(lm, ids, window, min(stride, window), on_window=kl_text)
            got = [lm(input_ids=torch.tensor([p])).logits[0] for p in prompts]
            kl_f16 = None if ref is None else 0.0 if same else kl_text.mean()
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
               "kl_mean": kl, "top1_agreement": top1, "fallbacks": len(fallbacks(g, outtype)),
               "path": os.fspath(g), "imatrix": _imatrix_of(g), "kl_f16": kl_f16}
        rows.append(row)
        echo(f"{g}: {bpw:.2f} bits/weight, perplexity {row['perplexity']:.4f}, KL {kl:.5f}, top-1 {top1:.4f}"
             + (f", KL from the F16 {kl_f16:.5f}" if kl_f16 is not None else "")
             + (" (importance matrix)" if row["imatrix"] else ""))
    scratch.cleanup()
    result = {
        "llamaforge": GGUF_QUALITY, "model": os.fspath(model), "text": text_name,
        "window": window, "stride": min(stride, window), "scored_tokens": ref_nll["scored_tokens"],
        "prompt_positions": sum(len(p) for p in prompts),
        "reference": {"what": "the Hugging Face model, float32", "perplexity":
                      math.exp(ref_nll["nll_sum"] / ref_nll["scored_tokens"])},
        "exports": rows,
        "f16": os.fspath(f16) if f16 is not None else None,
        "side_by_side": side_by_side(rows),
    }
    if imatrix is not None:
        from ..export.imatrix import read_record

        rec = read_record(imatrix)
        result["imatrix"] = {"file": os.fspath(imatrix), "text": rec["text"], "text_sha256": rec["text_sha256"]}
    write_json(output, result)
    return result


def _reference_logprobs(f16, ids, window: int, stride: int, threads: int, folder: str):
    """The F16 GGUF's next-token log-probabilities at every scored position of the text (the
    perplexity's windows), computed once in llama.cpp and kept on disk (a float32 memmap, tokens x
    vocabulary), so each export's KL from the F16 costs no second pass of the F16."""
    import numpy as np

    lm = _LlamaCppLM(f16, window, threads)
    store = {}

    def keep(first, end, logp):
        if "rows" not in store:
            store["rows"] = np.lib.format.open_memmap(Path(folder) / "f16.npy", mode="w+", dtype=np.float32,
                                                      shape=(len(ids), logp.shape[-1]))
        store["rows"][first:end] = logp.numpy()

    try:
        sliding_window_nll(lm, ids, window, stride, on_window=keep)
    finally:
        lm.close()
    return store["rows"]


class _KLFrom:
    """Accumulates mean KL(F16 || this export) over the scored positions, window by window (an
    on_window callback of sliding_window_nll)."""

    def __init__(self, ref):
        self.ref, self.total, self.n = ref, 0.0, 0

    def __call__(self, first, end, logp):
        import torch

        la = torch.from_numpy(self.ref[first:end]).double()
        self.total += float((la.exp() * (la - logp.double())).sum())
        self.n += end - first

    def mean(self) -> float:
        return self.total / self.n


def _imatrix_of(path: Path) -> str | None:
    """quantize.imatrix.file of a GGUF llama-quantize made with an importance matrix, else None."""
    from ..export.quantize import header_string

    return header_string(path, "quantize.imatrix.file")


def side_by_side(rows: Sequence[dict]) -> list[dict]:
    """Per quantized type, its export without and with the importance matrix (perplexity, KL from
    the F16, KL from the Hugging Face model, bits per weight), and what the matrix changed: a
    negative change is a gain; a positive one (as Q2_K can show) is a loss, shown as measured."""
    keys = ("file", "path", "perplexity", "kl_f16", "kl_mean", "top1_agreement", "bits_per_weight")
    out = []
    for outtype in dict.fromkeys(r["outtype"] for r in rows):
        plain = next((r for r in rows if r["outtype"] == outtype and not r["imatrix"]), None)
        calibrated = next((r for r in rows if r["outtype"] == outtype and r["imatrix"]), None)
        if calibrated is None:
            continue
        pair = {"outtype": outtype, "plain": plain and {k: plain[k] for k in keys},
                "imatrix": {k: calibrated[k] for k in keys}}
        if plain is not None:
            for k in ("perplexity", "kl_f16", "kl_mean"):
                if plain[k] is not None and calibrated[k] is not None:
                    pair[f"{k}_change"] = calibrated[k] - plain[k]
        out.append(pair)
    return out


def _check_not_calibration(text_file, imatrix) -> None:
    """One line when the evaluation text is the importance matrix's calibration text."""
    import hashlib

    from ..export.imatrix import read_record
    from ..tokenizer import bundled_text

    rec = read_record(imatrix)
    data = Path(text_file).read_bytes() if text_file is not None else bundled_text("eval_text.txt").encode("utf-8")
    if hashlib.sha256(data).hexdigest() == rec["text_sha256"]:
        raise LlamaforgeError(f"the evaluation text is the calibration text of the importance matrix {imatrix} "
                              f"(sha256 {rec['text_sha256'][:16]}...): the gain would be measured where it can be faked",
                              text_file or "eval.text", "set eval.text to a text the calibration never saw, or "
                              "calibrate on another text (models.NAME.imatrix.text)")


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

    from ..export.quantize import header_scalars

    ft = header_scalars(path).get("general.file_type")
    try:
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file_type {ft}"
