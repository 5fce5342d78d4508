"""The prompts of a multiple-choice evaluation, as Chinese-LLaMA-Alpaca's scripts and MMLU write them.

C-Eval and CMMLU CSVs (Chinese-LLaMA-Alpaca-2 scripts/ceval/llama_evaluator.py and
scripts/cmmlu/llama2_evaluator.py, `with_prompt=False`, no chain of thought):

    [以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n       (only with shots)
     {shot question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{letter}\\n\\n ...]
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

JSONL (MMLU's own format, Hendrycks et al. and lm-evaluation-harness's `mmlu`):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    [{shot question}\\nA. ...\\nAnswer: {letter}\\n\\n ...]
    {question}\\nA. ...\\nAnswer:

Two prompts per question, from the same question, shots, header and template:
- the lettered prompt above (the options listed, shots answered by letter): Chinese-LLaMA-Alpaca's
  first-token scoring reads the letters' logits after it;
- the cloze prompt, the same without the options (shots answered by their choice's text): the
  lm-evaluation-harness scoring takes each choice's text as its continuation (the harness's
  formulation of ARC, HellaSwag and mmlu_continuation, where acc_norm matters; with the options
  listed a small model mostly copies the last option: SmolLM2-135M-Instruct answers 31% of easy
  4-choice questions that way and 81% in cloze form).

Shots: the first K rows of the dev file, as C-Eval's dev split is used. With a chat template
(`--template auto` and a tokenizer that has one: Chinese-LLaMA-Alpaca's `with_prompt`), each shot is
one user turn (its question, options and answer cue) and one assistant turn (its letter), the header
goes before the first user turn, and the question is the last user turn followed by the template's
generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .data import LETTERS, Question

CEVAL_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclass(frozen=True)
class Style:
    header: str
    cue: str             # after the question (and its options); the answer follows it
    sep: str             # between the cue and an answer: a shot's, and the scored continuations
    always_header: bool  # MMLU's header is there with or without shots, Chinese-LLaMA-Alpaca's with shots only


STYLES = {
    "ceval": Style(CEVAL_HEADER, "\n答案：", "", False),
    "cmmlu": Style(CEVAL_HEADER, "\n答案：", "", False),
    "jsonl": Style(MMLU_HEADER, "\nAnswer:", " ", True),
}


def question_block(q: Question, style: Style, options: bool = True) -> str:
    """The question, its lettered options (unless `options` is false) and the answer cue."""
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)) if options else ""
    return q.question + opts + style.cue


def answer_of(q: Question, options: bool) -> str:
    """A shot's answer: its letter (lettered prompt), or its right choice's text (cloze prompt)."""
    return LETTERS[q.answer] if options else q.choices[q.answer]


def continuations(q: Question, fmt: str) -> list[str]:
    """The harness requests' continuations: the separator the shots show, then each choice's text."""
    return [STYLES[fmt].sep + c for c in q.choices]


def _subject(q: Question, fmt: str) -> str:
    return q.subject.replace("_", " ") if fmt == "jsonl" else q.subject


def build_prompt(q: Question, shots: Sequence[Question], fmt: str,
                 chat: Callable[[list[dict]], str] | None = None, options: bool = True) -> str:
    """The text before the answer of `q`: the lettered prompt (`options`), or the cloze one; with
    `chat`, the conversation the chat template renders (ending in its generation prompt)."""
    style = STYLES[fmt]
    header = style.header.format(subject=_subject(q, fmt)) if (shots or style.always_header) else ""
    if chat is None:
        return header + "".join(question_block(s, style, options) + style.sep + answer_of(s, options) + "\n\n"
                                for s in shots) + question_block(q, style, options)
    messages: list[dict] = []
    for s in shots:
        messages += [{"role": "user", "content": question_block(s, style, options)},
                     {"role": "assistant", "content": answer_of(s, options)}]
    messages.append({"role": "user", "content": question_block(q, style, options)})
    messages[0] = {"role": "user", "content": header + messages[0]["content"]}
    return chat(messages)
