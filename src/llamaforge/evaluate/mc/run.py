"""`scripts/evaluate.py multiple-choice`: score a model (Hugging Face folder or GGUF file) on a
multiple-choice set with two scorings on the same prompts, write the summary and one checkable line
per item.

Both scorings see the same question, shots, header and template (prompts.py): the harness's in
cloze form (the choices' texts continue the question), the first-token one in lettered form.

Scoring 1, lm-evaluation-harness's loglikelihood (lm_eval/api/model.py TemplateLM._encode_pair and
lm_eval/api/task.py process_results of multiple_choice):
  - request (context, continuation) per choice; the continuation is the target delimiter (" " after
    MMLU's "Answer:", "" after C-Eval's "答案：", as the shots show their answers) + the choice's text;
  - trailing whitespace of the context moves into the continuation;
  - tokens: context = tok(context), continuation = tok(context + continuation)[len(tok(context)):],
    a BOS first in both when the tokenizer adds one (`add_bos`);
  - loglik = sum of the continuation tokens' log probabilities;
  - acc: argmax loglik == gold; acc_norm: argmax loglik / len(choice) (characters of the choice
    string, without the delimiter: the harness's `completion_len`); acc_bytes: the same over its
    UTF-8 bytes (the harness's `byte_length`).
Scoring 2, Chinese-LLaMA-Alpaca's scripts/ceval `constrained_decoding`: the next-token logits after
the lettered prompt, per choice letter L the logit of tok("L")[0] plus that of tok("：L")[-1]; the argmax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ...errors import LlamaforgeError
from ...files.atomic import atomic_files
from ...files.guard import guard_output, json_of_kind, owned_by
from ..common import log
from .data import LETTERS, Question, load_questions
from .prompts import build_prompt, continuations as choice_continuations

MULTIPLE_CHOICE = "multiple_choice"
ITEM_KEYS = {"context", "continuations", "logliks", "gold", "add_bos", "choices", "first_token", "row"}


@owned_by("mc_items", "llamaforge multiple-choice items file")
def _items_are_own(path: Path) -> bool:
    """A JSONL file whose every line is an item object as `multiple_choice` writes it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(x) for x in f if x.strip()]
    except (OSError, ValueError):
        return False
    return bool(lines) and all(isinstance(x, dict) and set(x) == ITEM_KEYS for x in lines)


def encode_pair(encode, add_bos: bool, bos_id, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's TemplateLM._encode_pair for a decoder-only model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = [bos_id] if add_bos else []
    whole = prefix + encode(context + continuation)
    ctx = prefix + encode(context)
    return ctx, whole[len(ctx):]


def first_token_ids(encode, n: int) -> list[list[int]]:
    """Chinese-LLaMA-Alpaca's letter tokens: tok.encode("A", add_special_tokens=False)[0] and
    tok.encode("：A")[-1] (with the tokenizer's BOS; the last token is the same either way)."""
    return [[encode(L)[0], encode("：" + L)[-1]] for L in LETTERS[:n]]


def multiple_choice(output: str | os.PathLike, items: str | os.PathLike, data: str | os.PathLike,
                    model: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None,
                    shots: int = 0, dev: str | os.PathLike | None = None, template: str = "none",
                    threads: int = 0, echo=print) -> dict:
    """Score `model` (a Hugging Face folder, float32 on the CPU) or `gguf` (llama.cpp) on `data`;
    write the summary JSON `output` and the items JSONL `items` together."""
    if (model is None) == (gguf is None):
        raise LlamaforgeError("give either --model FOLDER or --gguf FILE", None, "pass exactly one of them")
    if shots and dev is None:
        raise LlamaforgeError(f"--shots {shots} needs the dev file the shots come from", None,
                              "pass --dev FILE (e.g. C-Eval's data/dev/{subject}_dev.csv)")
    inputs = [("data file", data), ("dev file", dev), ("model folder", model), ("GGUF file", gguf)]
    guard_output(output, "json", inputs + [("items file", items)], own=json_of_kind(MULTIPLE_CHOICE))
    guard_output(items, "mc_items", inputs + [("summary file", output)])
    if Path(output).resolve() == Path(items).resolve():
        raise LlamaforgeError("--output and --items are the same file", output, "give two different paths")
    fmt, questions = load_questions(data, "multiple-choice data")
    dev_qs: list[Question] = []
    if shots:
        dev_fmt, dev_qs = load_questions(dev, "dev file")
        if dev_fmt != fmt:
            raise LlamaforgeError(f"the dev file is {dev_fmt}, the data {fmt}", dev, "give a dev file in the data's format")
        if len(dev_qs) < shots:
            raise LlamaforgeError(f"--shots {shots} but the dev file has {len(dev_qs)} question(s)", dev,
                                  f"lower --shots to {len(dev_qs)} or give a longer dev file")
        dev_qs = dev_qs[:shots]
    from .backends import GGUFBackend, HFBackend

    lm = HFBackend(model, echo=echo) if model is not None else GGUFBackend(gguf, threads, echo=echo)
    try:
        if template == "auto" and lm.chat_template is None:
            echo("the tokenizer has no chat template: the prompts are used as they are (--template auto)")
        chat = lm.chat if template == "auto" and lm.chat_template else None
        rows = [_score_item(lm, q, dev_qs, fmt, chat, data) for q in questions]
    finally:
        lm.close()
    result = _summary(rows, questions, fmt, data, dev, shots, template, chat is not None, lm, model, gguf)
    with atomic_files([items, output]) as (tmp_items, tmp_out):
        with open(tmp_items, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        from ...files.atomic import finite_json

        with open(tmp_out, "w", encoding="utf-8") as f:
            json.dump(finite_json(result), f, ensure_ascii=False, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
    s = result["scores"]
    echo(f"{result['questions']} questions: acc {s['acc']:.4f}, acc_norm {s['acc_norm']:.4f}, "
         f"first-token acc {s['first_token_acc']:.4f} (chance {result['chance']:.4f})")
    return result


def _bos_for(lm, text: str) -> bool:
    """Whether a BOS goes before `text`: the tokenizer's default, unless the text (a chat template's
    rendering) starts with the BOS already."""
    return lm.add_bos and not (lm.bos_text and text.startswith(lm.bos_text))


def _score_item(lm, q: Question, shots: Sequence[Question], fmt: str, chat, data) -> dict:
    import math

    context = build_prompt(q, shots, fmt, chat, options=False)
    add_bos = _bos_for(lm, context)
    continuations = choice_continuations(q, fmt)
    pairs = [encode_pair(lm.encode, add_bos, lm.bos_id, context, c) for c in continuations]
    ctx_ids = pairs[0][0]
    if any(not cont for _, cont in pairs) or not ctx_ids:
        raise LlamaforgeError(f"row {q.row}: a choice tokenizes to nothing after its context", data,
                              "give every choice some text")
    lettered = build_prompt(q, shots, fmt, chat, options=True)
    ft_bos = _bos_for(lm, lettered)
    ft_ids = ([lm.bos_id] if ft_bos else []) + lm.encode(lettered)
    longest = max(len(ctx_ids) + max(len(cont) for _, cont in pairs), len(ft_ids))
    if longest > lm.context_length:
        raise LlamaforgeError(f"row {q.row}: the prompt and its longest choice are {longest} tokens, more than the "
                              f"model's context of {lm.context_length}", data, "use fewer --shots or shorter questions")
    logliks = lm.score(ctx_ids, [cont for _, cont in pairs])
    last = lm.next_logits(ft_ids)
    letter_ids = first_token_ids(lm.encode, len(q.choices))
    ft = [float(last[a]) + float(last[b]) for a, b in letter_ids]
    if not all(math.isfinite(x) for x in logliks + ft):
        raise LlamaforgeError(f"row {q.row}: the model's log probabilities are not finite", lm.name,
                              "check the model (NaN or infinite weights)")
    return {"row": q.row, "context": context, "continuations": continuations, "choices": list(q.choices),
            "logliks": logliks, "gold": q.answer, "add_bos": add_bos,
            "first_token": {"prompt": lettered, "add_bos": ft_bos, "letter_ids": letter_ids, "scores": ft,
                            "pred": _argmax(ft)}}


def _argmax(xs: Sequence[float]) -> int:
    """numpy's argmax: the first of equal maxima."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def predictions(item: dict) -> dict:
    """acc, acc_norm, acc_bytes and first-token predictions of one item, as the harness computes
    them from its logliks and choices."""
    lls, choices = item["logliks"], item["choices"]
    return {"acc": _argmax(lls),
            "acc_norm": _argmax([ll / len(c) for ll, c in zip(lls, choices)]),
            "acc_bytes": _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]),
            "first_token_acc": item["first_token"]["pred"]}


def _summary(rows, questions, fmt, data, dev, shots, template, templated, lm, model, gguf) -> dict:
    n = len(rows)
    hits = {k: 0 for k in ("acc", "acc_norm", "acc_bytes", "first_token_acc")}
    by_subject: dict[str, dict] = {}
    for r, q in zip(rows, questions):
        preds = predictions(r)
        s = by_subject.setdefault(q.subject, {"questions": 0, "acc": 0, "first_token_acc": 0})
        s["questions"] += 1
        for k, p in preds.items():
            hits[k] += int(p == r["gold"])
        s["acc"] += int(preds["acc"] == r["gold"])
        s["first_token_acc"] += int(preds["first_token_acc"] == r["gold"])
    for s in by_subject.values():
        s["acc"] /= s["questions"]
        s["first_token_acc"] /= s["questions"]
    out = {
        "llamaforge": MULTIPLE_CHOICE, "format": fmt, "data": os.fspath(data),
        "dev": os.fspath(dev) if dev is not None and shots else None, "shots": shots,
        "template": template, "chat_template_applied": templated,
        "questions": n, "chance": sum(1 / len(q.choices) for q in questions) / n,
        "scores": {k: v / n for k, v in hits.items()},
        "subjects": by_subject,
        "scorer": ({"kind": "huggingface", "model": os.fspath(model), "dtype": "float32", "device": "cpu"}
                   if model is not None else {"kind": "llama.cpp", "gguf": os.fspath(gguf)}),
        "mean_loglik_gold": sum(r["logliks"][r["gold"]] for r in rows) / n,
    }
    if gguf is not None:
        from ...export.quantize import bits_per_weight

        out["scorer"]["bits_per_weight"] = bits_per_weight(gguf)[0]
    log.debug("scored %d questions with %s", n, lm.name)
    return out
