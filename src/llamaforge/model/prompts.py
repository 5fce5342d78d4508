"""Prompt formats, defined once as data, and their three renderings.

Each `PromptFormat` says how a prompt is written: the header that opens it, how a system message,
a user turn and an assistant turn are written, what separates one answer from the next turn, and
the strings at which a model's answer has ended. From that one definition come

* `Template`: the prompt of llamaforge's inference (`TEMPLATES`, Python; generate.py),
* `jinja_chat_template`: the chat template written into a GGUF whose tokenizer has none
  (`ALPACA_CHAT_TEMPLATE`; export/gguf_meta.py), so llama.cpp's chat mode prompts as inference does,
* `modelfile_template`: the Go template and stop strings of an Ollama Modelfile (export/modelfile.py),
  for the format `prompt_format` reads off the model's own chat template.

No torch or transformers here: the tokenizer's chat template (`ChatTemplate`) is rendered by the
tokenizer object it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import LlamaforgeError

#: the placeholders of a format's texts (Ollama's Go templates call them .Prompt, .System, .Response)
PROMPT, SYSTEM, RESPONSE = "{prompt}", "{system}", "{response}"


@dataclass(frozen=True)
class PromptFormat:
    """One prompt format, as data.

    The text of `assistant` before {response} opens the answer (a generation prompt: "<|im_start|>assistant\\n");
    the text after it closes the answer. A prompt is: prefix, the system message (when given),
    header, then per turn: user, assistant.
    """

    name: str
    user: str  # a user turn, with {prompt}
    assistant: str = RESPONSE  # an assistant turn, with {response}
    header: str = ""  # opens every prompt (Alpaca: the task description; the GGUF template's default system text)
    system: str = ""  # a system message, with {system} ("": the format has none)
    separator: str = ""  # after an answer (and its closing text), before the next turn
    stops: tuple[str, ...] = ()  # strings that start a new turn: the answer ends there
    prefix: str = ""  # before the system message, opening the first turn (Mistral's "[INST] ")
    optional_prompt: bool = False  # the Go template writes the user turn only when there is a prompt

    @property
    def opening(self) -> str:
        """The assistant turn's text before the answer."""
        return self.assistant.split(RESPONSE, 1)[0]

    @property
    def closing(self) -> str:
        """The assistant turn's text after the answer."""
        return self.assistant.split(RESPONSE, 1)[1]


_ALPACA_HEADER = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.\n\n")

FORMATS: dict[str, PromptFormat] = {f.name: f for f in (
    # inference_hf.py's template (taken from llama.cpp; slightly different from training): the
    # Chinese-Alpaca recipe's, for a tokenizer without a chat template
    PromptFormat("alpaca", "### Instruction:\n\n{prompt}\n\n### Response:\n\n", header=_ALPACA_HEADER,
                 system="{system}\n\n", separator="\n\n", stops=("### Instruction:",)),
    # the template Chinese-Alpaca was trained with (scripts/training/build_dataset.py)
    PromptFormat("alpaca-train", "### Instruction:\n{prompt}\n\n### Response: ", header=_ALPACA_HEADER,
                 system="{system}\n\n", separator="\n\n", stops=("### Instruction:",)),
    # the text as given (inference_hf.py without --with_prompt)
    PromptFormat("none", PROMPT, separator="\n"),
    # ChatML (Qwen2, SmolLM2, ...)
    PromptFormat("chatml", "<|im_start|>user\n{prompt}<|im_end|>\n", "<|im_start|>assistant\n{response}<|im_end|>\n",
                 system="<|im_start|>system\n{system}<|im_end|>\n", stops=("<|im_start|>", "<|im_end|>"),
                 optional_prompt=True),
    # Llama-3.x Instruct
    PromptFormat("llama3", "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>",
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), optional_prompt=True),
    # Mistral / Llama-2 chat
    PromptFormat("inst", "{prompt} [/INST]", system="{system} ", stops=("[INST]", "[/INST]"), prefix="[INST] "),
    # Gemma-2/3 instruct: no system role (its chat template puts a system message at the head of the
    # first user turn, followed by a blank line), "model" answers
    PromptFormat("gemma", "{prompt}<end_of_turn>\n", "<start_of_turn>model\n{response}<end_of_turn>\n",
                 system="{system}\n\n", stops=("<end_of_turn>",), prefix="<start_of_turn>user\n"),
    # Phi-3 / Phi-3.5 / Phi-4-mini instruct
    PromptFormat("phi3", "<|user|>\n{prompt}<|end|>\n", "<|assistant|>\n{response}<|end|>\n",
                 system="<|system|>\n{system}<|end|>\n", stops=("<|end|>", "<|user|>", "<|assistant|>"),
                 optional_prompt=True),
)}

#: the formats an Ollama Modelfile is written in (prompt_format's answers)
MODELFILE_FORMATS = ("alpaca", "chatml", "llama3", "inst", "gemma", "phi3")


def prompt_format(chat_template: str | None) -> str:
    """The prompt format of a model by its tokenizer's chat template: chatml, llama3, gemma, phi3, inst,
    or alpaca (no chat template: the Chinese-Alpaca recipe's)."""
    if not chat_template:
        return "alpaca"
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<start_of_turn>" in chat_template:
        return "gemma"
    if "<|assistant|>" in chat_template and "<|end|>" in chat_template:
        return "phi3"
    if "[INST]" in chat_template:
        return "inst"
    return "alpaca"


def _turns_only(fmt: PromptFormat, what: str) -> None:
    if fmt.prefix:
        raise ValueError(f"the {fmt.name} format opens its first turn with {fmt.prefix!r}: it has no {what}")


# ---------------------------------------------------------------------------------------------
# Python: the prompts of llamaforge's inference


@dataclass(frozen=True)
class Template:
    """A prompt template: a header, then one `turn` per instruction (the response follows it)."""

    name: str
    header: str
    turn: str  # with {instruction}
    separator: str  # after a response, before the next turn (chat history)
    stop: str | None = None  # text that starts a new turn; a response is cut there in chat mode

    @classmethod
    def of(cls, fmt: PromptFormat, name: str | None = None) -> "Template":
        """The inference template of a format: its header, user turn + the assistant's opening text."""
        _turns_only(fmt, "inference template")
        return cls(name or fmt.name, fmt.header, fmt.user.replace(PROMPT, "{instruction}") + fmt.opening,
                   fmt.closing + fmt.separator, fmt.stops[0] if fmt.stops else None)

    def _turn(self, instruction: str) -> str:
        return self.turn.replace("{instruction}", instruction)

    def prompt(self, instruction: str, input: str | None = None) -> str:
        if input:
            instruction = f"{instruction}\n{input}"
        return self.header + self._turn(instruction)

    def chat(self, history: Sequence[tuple[str, str]], instruction: str) -> str:
        turns = "".join(self._turn(q) + a + self.separator for q, a in history)
        return self.header + turns + self._turn(instruction)

    #: the rendered text carries the special tokens (BOS, turn markers) itself: encode it without adding any
    special_in_text = False


class ChatTemplate(Template):
    """The tokenizer's own chat template (tokenizer_config.json / chat_template.jinja), rendered by
    transformers with a generation prompt, as `apply_chat_template` does."""

    special_in_text = True

    def __init__(self, tok):
        super().__init__("chat", "", "{instruction}", "")
        object.__setattr__(self, "_tok", tok)

    def _render(self, messages: list[dict]) -> str:
        try:
            return self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors: the template is the tokenizer's, not llamaforge's
            raise LlamaforgeError(f"the tokenizer's chat template fails: {str(e).splitlines()[0][:200]}", None,
                                  "fix the chat template in the tokenizer folder, or pass --template alpaca") from None

    def prompt(self, instruction: str, input: str | None = None) -> str:
        if input:
            instruction = f"{instruction}\n{input}"
        return self._render([{"role": "user", "content": instruction}])

    def chat(self, history: Sequence[tuple[str, str]], instruction: str) -> str:
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return self._render(messages + [{"role": "user", "content": instruction}])


TEMPLATES = {
    # the tokenizer's chat template when it has one, else alpaca (the Chinese-Alpaca recipe's)
    "auto": Template("auto", "", "{instruction}", ""),
    # the tokenizer's chat template (an error when it has none)
    "chat": Template("chat", "", "{instruction}", ""),
    "alpaca": Template.of(FORMATS["alpaca"]),
    "alpaca-train": Template.of(FORMATS["alpaca-train"]),
    "none": Template.of(FORMATS["none"]),
}


def get_template(name: str, with_prompt: bool = True) -> Template:
    if not with_prompt:
        return TEMPLATES["none"]
    try:
        return TEMPLATES[name]
    except KeyError:
        raise LlamaforgeError(f"unknown prompt template {name!r}", None,
                              f"use one of {', '.join(TEMPLATES)}") from None


def bind_template(tpl: Template, tok, folder=None) -> Template:
    """Resolve "auto" and "chat" against the loaded tokenizer: its chat template when it has one
    ("auto" falls back to alpaca, the template of the Chinese-Alpaca recipe, whose tokenizers have none)."""
    if tpl.name not in ("auto", "chat"):
        return tpl
    if getattr(tok, "chat_template", None):
        return ChatTemplate(tok)
    if tpl.name == "chat":
        raise LlamaforgeError("--template chat, but the tokenizer has no chat template", folder,
                              "use --template auto or alpaca, or a tokenizer with a chat template")
    return TEMPLATES["alpaca"]


# ---------------------------------------------------------------------------------------------
# Jinja: the chat template of a GGUF


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_fill(text: str, placeholder: str, expr: str) -> str:
    """`text` as a Jinja expression, `placeholder` replaced by `expr` (empty literals left out)."""
    before, after = text.split(placeholder, 1)
    return " + ".join([_jinja_str(before)] * bool(before) + [expr] + [_jinja_str(after)] * bool(after))


def jinja_chat_template(fmt: PromptFormat) -> str:
    """The format as a Hugging Face / llama.cpp chat template over `messages`: a leading system
    message replaces the header, each user message is a turn (with the assistant's opening text),
    each assistant message the answer, its closing text and the separator. It renders exactly the
    prompts of `Template.of(fmt)` (BOS comes from add_bos_token, not the template)."""
    _turns_only(fmt, "chat template")
    first = "messages[0]['content']"
    system = _jinja_fill(fmt.system or SYSTEM, SYSTEM, first)
    head = (f"{{%- else -%}}{{{{ {_jinja_str(fmt.header)} }}}}" if fmt.header else "") + "{%- endif -%}"
    user = _jinja_fill(fmt.user + fmt.opening, PROMPT, "message['content']")
    answer = _jinja_fill(RESPONSE + fmt.closing + fmt.separator, RESPONSE, "message['content']")
    return (
        f"{{%- if messages and messages[0]['role'] == 'system' -%}}{{{{ {system} }}}}"
        + head
        + "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{ {user} }}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {answer} }}}}{{%- endif -%}}"
        "{%- endfor -%}"
    )


#: The Alpaca prompt of inference_hf.py (TEMPLATES["alpaca"]) as a chat template, for the GGUF of a
#: model whose tokenizer has none (the Chinese-Alpaca recipe): llama.cpp's chat mode then formats
#: prompts as llamaforge's inference does.
ALPACA_CHAT_TEMPLATE = jinja_chat_template(FORMATS["alpaca"])


# ---------------------------------------------------------------------------------------------
# Go: the TEMPLATE and stop strings of an Ollama Modelfile


def go_template(fmt: PromptFormat) -> str:
    """The format in Ollama's Go template syntax (as Ollama's own library writes them): prefix, the
    system message when there is one, header, the user turn, the assistant turn."""
    def go(text: str) -> str:
        return text.replace(PROMPT, "{{ .Prompt }}").replace(SYSTEM, "{{ .System }}").replace(RESPONSE, "{{ .Response }}")

    system = "{{ if .System }}" + go(fmt.system) + "{{ end }}" if fmt.system else ""
    user = "{{ if .Prompt }}" + go(fmt.user) + "{{ end }}" if fmt.optional_prompt else go(fmt.user)
    return fmt.prefix + system + fmt.header + user + go(fmt.assistant)


def modelfile_template(name: str) -> tuple[str, list[str]]:
    """(TEMPLATE, stop strings) of the Modelfile of a model in prompt format `name`."""
    fmt = FORMATS[name]
    return go_template(fmt), list(fmt.stops)
