"""inference_hf.py's instruction mode (a REPL), and a multi-turn chat whose history is kept
within the context length."""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from .. import defaults as D
from ..model.prompts import Template, bind_template, get_template
from .generation import GenerationSettings, Generator
from .loading import load_model

log = logging.getLogger(__name__)


BANNER = (
    "=" * 85 + "\n"
    "+ 该模式下仅支持单轮问答，无多轮对话能力。（多轮对话：--chat）\n"
    "+ This mode only supports single-turn QA (multi-turn dialogue: --chat).\n" + "=" * 85
)
CHAT_BANNER = (
    "=" * 85 + "\n"
    "+ 多轮对话模式：历史超出上下文长度时丢弃最早的轮次。空行退出。\n"
    "+ Multi-turn chat: the oldest turns are dropped when the history exceeds the context. "
    "An empty line exits.\n" + "=" * 85
)


class ChatSession:
    """Multi-turn history rendered with a template, kept within the context length."""

    def __init__(self, gen: Generator, template: Template):
        self.gen = gen
        self.template = template
        self.history: list[tuple[str, str]] = []
        s = gen.settings
        ctx = gen.loaded.context_length
        # room for the prompt: the context minus the answer, but never less than half the context
        self.budget = max(ctx - s.max_new_tokens, ctx // 2)

    def prompt_ids(self, instruction: str) -> tuple[list[int], int]:
        """Token ids of the prompt with as much history as fits; returns (ids, turns kept)."""
        kept = len(self.history)
        while True:
            ids = self.gen.encode(self.template.chat(self.history[len(self.history) - kept:], instruction))
            if len(ids) <= self.budget or kept == 0:
                break
            kept -= 1
        if len(ids) > self.budget:
            log.warning("the instruction alone is %d tokens (room: %d); keeping its last tokens", len(ids), self.budget)
            bos = ids[:1] if ids[0] == self.gen.tok.bos_token_id else []
            ids = bos + ids[len(ids) - self.budget + len(bos):]
        return ids, kept

    def ask(self, instruction: str) -> str:
        ids, kept = self.prompt_ids(instruction)
        if kept < len(self.history):
            self.history = self.history[len(self.history) - kept:]
        room = self.gen.loaded.context_length - len(ids)
        out = self.gen.generate_ids([ids], max_new_tokens=max(1, min(self.gen.settings.max_new_tokens, room)))[0]
        answer = self.gen.decode(out)
        if self.template.stop and self.template.stop in answer:
            answer = answer.split(self.template.stop, 1)[0].strip()
        self.history.append((instruction, answer))
        return answer


def interactive(model: str | os.PathLike, loras: Sequence[str | os.PathLike] = (), tokenizer=None,
                template: str = D.TEMPLATE, with_prompt: bool = True, chat: bool = False,
                settings: GenerationSettings | None = None, device: str = "auto", dtype: str | None = "auto",
                allow_vocab_jump: bool = False, read: Callable[[str], str] = input, echo=print) -> int:
    """inference_hf.py's instruction mode: read a line, answer, until an empty line or end of input.

    Returns the number of answers given.
    """
    settings = (settings or GenerationSettings()).check()
    tpl = get_template(template, with_prompt)
    loaded = load_model(model, loras, tokenizer, device, dtype, allow_vocab_jump, echo=echo)
    gen = Generator(loaded, settings)
    tpl = bind_template(tpl, loaded.tokenizer, tokenizer or model)
    gen.add_special = not tpl.special_in_text
    session = ChatSession(gen, tpl) if chat else None
    echo("Start inference with instruction mode." if not chat else "Start inference with chat mode.")
    echo(CHAT_BANNER if chat else BANNER)
    answers = 0
    while True:
        try:
            line = read("Input:")
        except EOFError:
            echo("")
            break
        if not line.strip():
            break
        if session is not None:
            response = session.ask(line.strip())
        else:
            response = gen.generate([tpl.prompt(line.strip())], batch_size=1)[0].text
        echo(f"Response: {response}\n")
        answers += 1
    return answers
