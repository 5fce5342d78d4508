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
    cue: str          # after the options; the answer letter follows it
    shot_answer: str  # how a shot's answer follows the cue ({letter})
    always_header: bool


STYLES = {
    "ceval": Style(CEVAL_HEADER, "\n答案：", "{letter}\n\n", False),
    "cmmlu": Style(CEVAL_HEADER, "\n答案：", "{letter}\n\n", False),
    "jsonl": Style(MMLU_HEADER, "\nAnswer:", " {letter}\n\n", True),
}


def question_block(q: Question, style: Style) -> str:
    """The question, its lettered options and the answer cue."""
    return q.question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)) + style.cue


def _subject(q: Question, fmt: str) -> str:
    return q.subject.replace("_", " ") if fmt == "jsonl" else q.subject


def build_prompt(q: Question, shots: Sequence[Question], fmt: str,
                 chat: Callable[[list[dict]], str] | None = None) -> str:
    """The text before the answer of `q` (without chat template: Chinese-LLaMA-Alpaca's / MMLU's
    plain prompt; with `chat`: the conversation it renders)."""
    style = STYLES[fmt]
    header = style.header.format(subject=_subject(q, fmt)) if (shots or style.always_header) else ""
    if chat is None:
        return header + "".join(question_block(s, style) + style.shot_answer.format(letter=LETTERS[s.answer])
                                for s in shots) + question_block(q, style)
    messages: list[dict] = []
    for s in shots:
        messages += [{"role": "user", "content": question_block(s, style)},
                     {"role": "assistant", "content": LETTERS[s.answer]}]
    messages.append({"role": "user", "content": question_block(q, style)})
    messages[0] = {"role": "user", "content": header + messages[0]["content"]}
    return chat(messages)
