"""Inference: prompt templates, instruction files, model + adapter loading, batched generation, REPL.

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

Heavy imports (torch, transformers, peft) stay inside functions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import LlamaforgeError
from . import defaults as D
from .fsutil import atomic_file, guard_output, json_of_kind, read_text, require_dir, write_json
from .tokenizer import HF_FILES, ships_padding

log = logging.getLogger(__name__)

PREDICT = "predict"  # the "llamaforge" value of generation_config.json written beside predictions

# ---------------------------------------------------------------------------------------------
# Generation settings and prompt templates

#: inference_hf.py's generation_config (the later release, with repetition_penalty 1.1).
ORIGINAL_GENERATION = dict(temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1,
                           repetition_penalty=1.1, max_new_tokens=400)

#: inference_hf.py's sample instruction, used when no data file is given.
SAMPLE_DATA = ["为什么要减少污染，保护环境？"]

_HEADER = ("Below is an instruction that describes a task. "
           "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class Template:
    """A prompt template: a header, then one `turn` per instruction (the response follows it)."""

    name: str
    header: str
    turn: str  # with {instruction}
    separator: str  # after a response, before the next turn (chat history)
    stop: str | None = None  # text that starts a new turn; a response is cut there in chat mode

    def prompt(self, instruction: str, input: str | None = None) -> str:
        if input:
            instruction = f"{instruction}\n{input}"
        return self.header + self.turn.format(instruction=instruction)

    def chat(self, history: Sequence[tuple[str, str]], instruction: str) -> str:
        turns = "".join(self.turn.format(instruction=q) + a + self.separator for q, a in history)
        return self.header + turns + self.turn.format(instruction=instruction)

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
    # inference_hf.py's template (taken from llama.cpp; slightly different from training)
    "alpaca": Template("alpaca", _HEADER, "### Instruction:\n\n{instruction}\n\n### Response:\n\n", "\n\n",
                       stop="### Instruction:"),
    # the template Chinese-Alpaca was trained with (scripts/training/build_dataset.py)
    "alpaca-train": Template("alpaca-train", _HEADER, "### Instruction:\n{instruction}\n\n### Response: ", "\n\n",
                             stop="### Instruction:"),
    # the text as given (inference_hf.py without --with_prompt)
    "none": Template("none", "", "{instruction}", "\n"),
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


@dataclass
class GenerationSettings:
    """Sampling settings; the defaults are inference_hf.py's."""

    temperature: float = ORIGINAL_GENERATION["temperature"]
    top_k: int = ORIGINAL_GENERATION["top_k"]
    top_p: float = ORIGINAL_GENERATION["top_p"]
    do_sample: bool = True
    num_beams: int = 1
    repetition_penalty: float = ORIGINAL_GENERATION["repetition_penalty"]
    max_new_tokens: int = ORIGINAL_GENERATION["max_new_tokens"]
    seed: int | None = None

    def check(self) -> "GenerationSettings":
        def bad(what, fix):
            raise LlamaforgeError(what, None, fix)

        if self.max_new_tokens < 1:
            bad(f"max_new_tokens is {self.max_new_tokens}", "give at least 1")
        # written so that NaN fails every check (every comparison with NaN is false)
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty is {self.repetition_penalty}", "give a positive number (1.0 = off)")
        if self.do_sample:
            if not self.temperature > 0:
                bad(f"temperature is {self.temperature}", "give a positive temperature, or use --greedy")
            if not 0 < self.top_p <= 1:
                bad(f"top_p is {self.top_p}", "give a value in (0, 1]")
            if not self.top_k >= 0:
                bad(f"top_k is {self.top_k}", "give 0 (off) or a positive number")
        if self.num_beams != 1:
            bad("beam search is not supported", "use num_beams 1")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            bad(f"seed is {self.seed}; a sampling seed is 0 to 4294967295 (numpy's range)",
                "give a seed in that range, or none (unseeded)")
        return self

    def to_json(self) -> dict:
        """The original's generation_config keys (+ seed); sampling keys are kept under greedy, as unused."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Instruction files


@dataclass
class Example:
    instruction: str
    input: str = ""


def _record(obj, path, where) -> Example:
    if isinstance(obj, str):
        text = obj.strip()
        if not text:
            raise LlamaforgeError(f"{where}: empty instruction", path, "remove the empty entry")
        return Example(text)
    if not isinstance(obj, dict):
        raise LlamaforgeError(f"{where}: expected an object with 'instruction' (and 'input'), got "
                              f"{type(obj).__name__}", path, "write Alpaca records: {\"instruction\": ..., \"input\": ...}")
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise LlamaforgeError(f"{where}: record has no 'instruction' text", path,
                              "give every record a non-empty \"instruction\" string")
    inp = obj.get("input") or ""
    if not isinstance(inp, str):
        raise LlamaforgeError(f"{where}: 'input' is {type(inp).__name__}, not text", path,
                              "make \"input\" a string (or leave it out)")
    return Example(instruction.strip(), inp.strip())


def read_examples(path: str | os.PathLike, text: str | None = None) -> list[Example]:
    """Instructions from a text file (one a line), a JSON list of Alpaca records, or JSONL records.

    The format is chosen by the suffix: `.json`, `.jsonl`, anything else is text. Blank lines are
    skipped. `text`, when given, is the file's content already read (a bundled file).
    """
    p = Path(path)
    if text is None:
        text = read_text(p, "instruction file")
    suffix = p.suffix.lower()
    examples: list[Example] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlamaforgeError(f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})", p,
                                  "fix the JSON, or use .jsonl for one record a line / .txt for one instruction a line") from None
        except RecursionError:
            raise LlamaforgeError("invalid JSON (nested too deeply)", p, "write a list of Alpaca records") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise LlamaforgeError("JSON file is not a list of records", p, "write a list of Alpaca records")
        examples = [_record(obj, p, f"record {i}") for i, obj in enumerate(data)]
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise LlamaforgeError(f"line {n} is not JSON ({getattr(e, 'msg', 'nested too deeply')})", p,
                                      "write one JSON record a line") from None
            examples.append(_record(obj, p, f"line {n}"))
    else:
        examples = [Example(line.strip()) for line in text.splitlines() if line.strip()]
    if not examples:
        raise LlamaforgeError("no instruction in the file", p, "write at least one instruction")
    return examples


# ---------------------------------------------------------------------------------------------
# Models, adapters and the vocabulary chain

@dataclass
class AdapterInfo:
    path: Path
    rows: int | None  # rows of the full embed_tokens / lm_head the adapter stores (None: LoRA only)
    tokenizer_len: int | None = None  # length of the tokenizer in the adapter's folder
    pad_id: int | None = None  # that tokenizer's pad token id


def inspect_adapter(folder: str | os.PathLike, base_names) -> AdapterInfo:
    """Read an adapter folder's tensor directory (no weights), mapped onto the base's tensor names,
    and the length of the tokenizer stored with it (read without transformers)."""
    from .lora import open_adapter
    from .names import EMBED_HF, LM_HEAD_HF
    from .tokenizer import check_tokenizer
    from .tokenizer import load_proto, special_ids

    d = require_dir(folder, "adapter folder")
    if not (d / "adapter_config.json").is_file():
        raise LlamaforgeError("no adapter_config.json: not a PEFT adapter folder", d,
                              "point --lora (or loras: in config.yaml) at a folder holding adapter_config.json "
                              "and adapter_model.safetensors")
    ad = open_adapter(d, base_names)
    try:
        embed, head = ad.full_rows(EMBED_HF), ad.full_rows(LM_HEAD_HF)
    finally:
        ad.close()
    if embed is not None and head is not None and embed != head:
        raise LlamaforgeError(f"the adapter's embed_tokens has {embed} rows but its lm_head {head}", ad.weights_file,
                              "use an adapter whose embedding and head match")
    info = AdapterInfo(d, embed if embed is not None else head)
    # the merge's rule (merge._resolve_tokenizer): an adapter has a tokenizer when tokenizer.model is beside it
    if (d / "tokenizer.model").is_file():
        info.tokenizer_len = check_tokenizer(d)
        info.pad_id = special_ids(load_proto(d / "tokenizer.model"), d).get("pad")
        if info.rows is not None and info.tokenizer_len != info.rows:
            raise LlamaforgeError(
                f"the adapter stores {info.rows} embedding rows but the tokenizer in its folder has "
                f"{info.tokenizer_len} tokens", d,
                "keep each adapter with its own tokenizer: the LLaMA tokenizer with the LLaMA(-Plus) LoRA and the "
                "Alpaca tokenizer with the Alpaca(-Plus) LoRA")
    return info


def inspect_adapters(model: str | os.PathLike, loras: Sequence[str | os.PathLike]) -> list[AdapterInfo]:
    """inspect_adapter for each of `loras`, against the tensors of the model they are applied to
    (plus lm_head when its embeddings are tied, as the merge does)."""
    if not loras:
        return []
    from .formats import ModelSource, read_hf_config
    from .names import LM_HEAD_HF

    src = ModelSource(model)
    try:
        names = set(src.keys())
    finally:
        src.close()
    if read_hf_config(model).get("tie_word_embeddings", False):
        names.add(LM_HEAD_HF)
    return [inspect_adapter(p, names) for p in loras]


def plan_vocab(base_vocab: int, adapters: Sequence[AdapterInfo], tokenizer_len: int | None = None,
               tokenizer_path: str | os.PathLike | None = None, base_path: str | os.PathLike | None = None,
               allow_vocab_jump: bool = False, tokenizer_pad_id: int | None = None) -> list[int]:
    """The embedding rows the model has after each step: [base, after adapter 1, ...].

    Raises for the known misuses of the Chinese-LLaMA/Alpaca chain (32000 -> 49953 -> 49954).
    """
    sizes = [base_vocab]
    cur = base_vocab
    for i, a in enumerate(adapters):
        rows = a.rows
        if rows is None:
            sizes.append(cur)
            continue
        if rows < cur:
            raise LlamaforgeError(
                f"the adapter stores {rows} embedding rows but the model it is applied to already has {cur}; "
                "the vocabulary must never shrink along the adapter list", a.path,
                "list the adapters in training order (LLaMA-Plus before Alpaca-Plus) on the base they were trained on")
        pad = a.pad_id
        if pad is None and a.tokenizer_len is None and i == len(adapters) - 1 and tokenizer_len == rows:
            pad = tokenizer_pad_id  # no tokenizer beside the adapter: the model's tokenizer speaks for it
        if not allow_vocab_jump and pad is not None and pad == rows - 1 and cur < rows - 1:
            raise LlamaforgeError(
                f"this is an Alpaca-Plus-style adapter ({rows - 1} pieces + a padding token = {rows} rows), applied "
                f"to a model with {cur} rows that lacks the LLaMA-Plus vocabulary. Alpaca-Plus is trained on top of "
                "LLaMA-Plus: the chain is LLaMA (32000) -> LLaMA-Plus LoRA (49953) -> Alpaca-Plus LoRA (49954)", a.path,
                "apply the LLaMA-Plus adapter first (--lora LLAMA_PLUS --lora ALPACA_PLUS; loras: [llama_plus, "
                "alpaca_plus] in config.yaml); if this adapter really was trained on the base directly (Chinese-Alpaca "
                "v1), pass --allow-vocab-jump")
        cur = rows
        sizes.append(cur)
    # embeddings padded past the tokenizer, as released (Qwen2: 151936 rows for 151665 tokens): the merge's rule
    padded = (tokenizer_len is not None and tokenizer_len < cur == base_vocab and all(a.rows is None for a in adapters)
              and ships_padding(base_path, base_vocab))
    if tokenizer_len is not None and tokenizer_len != cur and not padded:
        chain = " -> ".join(str(s) for s in sizes)
        if tokenizer_len > cur and all(a.rows is None for a in adapters):
            why = (f"no adapter stores full embeddings, so the model keeps {cur} rows; new rows would be untrained "
                   "(e.g. a 49953-token Chinese tokenizer on the 32000-row LLaMA needs the LLaMA-Plus adapter)")
        else:
            why = f"the model has {cur} embedding rows after its adapters ({chain})"
        raise LlamaforgeError(
            f"the tokenizer has {tokenizer_len} tokens but {why}", tokenizer_path,
            "use the tokenizer that belongs to the last adapter (or to the merged model), e.g. tokenizers/<name> "
            "built with the same add_tokens" + ("" if base_path is None else f"; base: {os.fspath(base_path)}"))
    return sizes


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LlamaforgeError("--device cuda but no CUDA device is available", None,
                              "use --device cpu (or auto), or run on a GPU node (gpu: 1 in config.yaml)")
    if device not in ("cpu", "cuda"):
        raise LlamaforgeError(f"unknown device {device!r}", None, "use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """float32 on the CPU (float16 matmuls are slow and inexact there), float16 on CUDA, unless given."""
    import torch

    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.float16
    from .formats import torch_dtype

    return torch_dtype(dtype)


def _dtype_kwarg(dtype) -> dict:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def base_vocab_size(folder: str | os.PathLike) -> int:
    from .formats import read_hf_config

    cfg = read_hf_config(folder)
    n = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not isinstance(n, int):
        raise LlamaforgeError("config.json has no vocab_size", Path(folder) / "config.json", "add vocab_size")
    return n


def check_model_config(folder: str | os.PathLike) -> None:
    """The clear error for a Meta checkpoint, a folder without config.json, one whose counts are
    garbled (a string, 0, null) or whose generation_config.json is no object: never a traceback
    from transformers (which reads both when it loads the tokenizer or the model)."""
    from .formats import read_hf_config
    from .fsutil import read_json_object
    from .names import dims_from_config

    dims_from_config(read_hf_config(folder), Path(folder) / "config.json")
    if (Path(folder) / "generation_config.json").is_file():
        read_json_object(Path(folder) / "generation_config.json", "generation_config.json")


def load_causal_lm(folder: str | os.PathLike, dtype, device: str = "cpu"):
    """AutoModelForCausalLM in `dtype` on `device`, in eval mode, never trusting remote code."""
    from transformers import AutoModelForCausalLM

    from .formats import ModelSource

    check_model_config(folder)
    # every weight file checked first, pickles with weights_only=True: a hostile .bin is one clear
    # error here, not a traceback from transformers
    ModelSource(folder).close()
    model = AutoModelForCausalLM.from_pretrained(os.fspath(folder), trust_remote_code=False, **_dtype_kwarg(dtype))
    if device != "cpu":
        model = model.to(device)
    model.eval()
    return model


def resize_embeddings(model, rows: int) -> None:
    """Grow embed_tokens/lm_head to `rows`, new rows set to the mean of the old ones.

    Deterministic (transformers' mean_resizing samples each new row from a normal, ~36 ms a row at
    hidden 2048; mean_resizing=False leaves them random), so results that see those rows, e.g.
    the equivalence check with the last adapter disabled, are reproducible.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    if rows <= old:
        return
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            w = layer.weight
            w[old:] = w[:old].mean(dim=0, keepdim=True)


def apply_adapters(model, adapters: Sequence[AdapterInfo], sizes: Sequence[int]):
    """Apply adapters in order: resize to each one's vocabulary, merge all but the last (PEFT).

    Full tensors an adapter stores (embed_tokens / lm_head) replace the model's, so the embedding is
    first resized to the adapter's rows (mean_resizing=False: the adapter overwrites every row).
    """
    import warnings

    from peft import PeftModel

    for i, (a, rows) in enumerate(zip(adapters, sizes[1:])):
        if model.get_input_embeddings().weight.shape[0] != rows:
            resize_embeddings(model, rows)
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, os.fspath(a.path), is_trainable=False)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    model.eval()
    return model


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: str
    dtype: object
    vocab: int
    context_length: int
    sources: dict = field(default_factory=dict)


def default_tokenizer_dir(model: str | os.PathLike, loras: Sequence[str | os.PathLike] = ()) -> Path:
    """The merge's rule (merge._resolve_tokenizer): the last adapter folder holding tokenizer.model,
    else the model's folder."""
    return next((Path(p) for p in reversed(loras) if (Path(p) / "tokenizer.model").is_file()), Path(model))


def load_tokenizer(folder: str | os.PathLike):
    from .tokenizer import load_hf_tokenizer

    d = require_dir(folder, "tokenizer folder")
    if not any((d / f).is_file() for f in HF_FILES):
        raise LlamaforgeError("no tokenizer files (tokenizer.json, tokenizer.model)", d,
                              "pass --tokenizer with a tokenizer folder, e.g. tokenizers/<name>")
    tok = load_hf_tokenizer(d)
    if len(tok) < 10:
        raise LlamaforgeError(f"the tokenizer loaded with only {len(tok)} tokens", d,
                              "rebuild it with scripts/merge_tokenizers.py (writes tokenizer.json)")
    return tok


def load_model(model: str | os.PathLike, loras: Sequence[str | os.PathLike] = (), tokenizer=None,
               device: str = "auto", dtype: str | None = "auto", allow_vocab_jump: bool = False,
               echo: Callable[[str], None] | None = None) -> Loaded:
    """Tokenizer + model (+ adapters on the fly), checked before any weight is read."""
    echo = echo or log.info
    require_dir(model, "model folder")
    check_model_config(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok_dir = Path(tokenizer) if tokenizer else default_tokenizer_dir(model, loras)
    tok = load_tokenizer(tok_dir)
    base_vocab = base_vocab_size(model)
    infos = inspect_adapters(model, loras)
    sizes = plan_vocab(base_vocab, infos, len(tok), tok_dir, model, allow_vocab_jump, tok.pad_token_id)
    echo(f"Vocab of the model: {base_vocab}" + (f" -> {' -> '.join(map(str, sizes[1:]))} with adapters" if infos else ""))
    echo(f"Vocab of the tokenizer: {len(tok)} ({tok_dir})")
    m = load_causal_lm(model, dt, dev)
    if infos:
        echo(f"Applying {len(infos)} adapter(s) with PEFT: {', '.join(os.fspath(a.path) for a in infos)}")
        m = apply_adapters(m, infos, sizes)
        if dev != "cpu":
            m = m.to(dev)
        # adapters are stored in float16; compute in the requested dtype
        m = m.to(dt)
    context = getattr(m.config, "max_position_embeddings", None) or 2048
    return Loaded(m, tok, dev, dt, sizes[-1], int(context),
                  {"model": os.fspath(model), "loras": [os.fspath(p) for p in loras], "tokenizer": os.fspath(tok_dir)})


# ---------------------------------------------------------------------------------------------
# Batched generation


def _padded_penalty_class():
    from transformers import LogitsProcessor

    class PaddedRepetitionPenalty(LogitsProcessor):
        """The CTRL repetition penalty (as Hugging Face's), ignoring each row's left padding.

        Hugging Face's processor counts pad tokens as seen, so a padded row would penalise the pad
        id and a batch could decode differently from the same prompt alone.
        """

        def __init__(self, penalty: float, pad_lengths):
            self.penalty = float(penalty)
            self.pad_lengths = pad_lengths

        def __call__(self, input_ids, scores):
            import torch

            b, v = scores.shape
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            pads = self.pad_lengths.to(input_ids.device)
            ids = input_ids.masked_fill(pos[None, :] < pads[:, None], v)  # padding -> a spare column
            ext = torch.cat([scores, scores.new_zeros(b, 1)], dim=1)
            seen = ext.gather(1, ids)
            seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
            return ext.scatter(1, ids, seen)[:, :v]

    return PaddedRepetitionPenalty


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class Generated:
    prompt: str
    ids: list[int]  # generated token ids, up to and without EOS
    text: str


class Generator:
    """Batched generation with left padding; identical token ids per prompt under greedy decoding."""

    def __init__(self, loaded: Loaded, settings: GenerationSettings):
        import torch

        self.loaded = loaded
        self.settings = settings.check()
        self.tok = loaded.tokenizer
        self.pad_id = _pad_id(self.tok)
        # generation stops at the tokenizer's EOS and at every EOS of the model's generation_config
        # (Llama-3 Instruct ends a turn with <|eot_id|>, Qwen2 with <|im_end|>)
        eos = [self.tok.eos_token_id]
        model_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
        eos += model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]
        self.eos_ids = list(dict.fromkeys(int(e) for e in eos if e is not None))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.add_special = True  # False for templates whose text holds the special tokens (chat templates)
        self._penalty = _padded_penalty_class()
        self._torch = torch
        if settings.seed is not None:
            from transformers import set_seed

            set_seed(int(settings.seed))

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        s = self.settings
        kw = dict(max_new_tokens=max_new_tokens, num_beams=1, do_sample=s.do_sample,
                  # the padding-aware penalty is passed as a processor; Hugging Face's own stays off
                  repetition_penalty=1.0, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                  bos_token_id=self.tok.bos_token_id)
        if s.do_sample:
            kw.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        return GenerationConfig(**kw)

    def encode(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=self.add_special).input_ids

    def generate_ids(self, batch: Sequence[list[int]], max_new_tokens: int | None = None) -> list[list[int]]:
        """Generate for a batch of token id lists (left padded together); returns new ids without EOS."""
        from transformers import LogitsProcessorList

        torch = self._torch
        n = max_new_tokens or self.settings.max_new_tokens
        width = max(len(ids) for ids in batch)
        pads = [width - len(ids) for ids in batch]
        input_ids = torch.tensor([[self.pad_id] * p + list(ids) for p, ids in zip(pads, batch)], dtype=torch.long)
        mask = torch.tensor([[0] * p + [1] * len(ids) for p, ids in zip(pads, batch)], dtype=torch.long)
        procs = LogitsProcessorList()
        if self.settings.repetition_penalty != 1.0:
            procs.append(self._penalty(self.settings.repetition_penalty, torch.tensor(pads)))
        dev = self.loaded.device
        with torch.inference_mode():
            out = self.loaded.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                                             generation_config=self._generation_config(n), logits_processor=procs)
        result = []
        for row in out[:, width:].tolist():
            ends = [row.index(e) for e in self.eos_ids if e in row]
            if ends:
                row = row[:min(ends)]
            result.append(row)
        return result

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def generate(self, prompts: Sequence[str], batch_size: int = 8,
                 progress: Callable[[int, int], None] | None = None) -> list[Generated]:
        """Generate for every prompt, `batch_size` at a time (longest first, to pad little)."""
        if batch_size < 1:
            raise LlamaforgeError(f"batch size is {batch_size}", None, "give a batch size of at least 1")
        encoded = [self.encode(p) for p in prompts]
        limit = self.loaded.context_length
        for p, ids in zip(prompts, encoded):
            if len(ids) + self.settings.max_new_tokens > limit:
                log.warning("prompt of %d tokens + %d new tokens exceeds the context length %d: %.40r...",
                            len(ids), self.settings.max_new_tokens, limit, p)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[Generated | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            outs = self.generate_ids([encoded[i] for i in idx])
            for i, ids in zip(idx, outs):
                results[i] = Generated(prompts[i], ids, self.decode(ids))
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Entry points


def predict(model: str | os.PathLike, predictions_file: str | os.PathLike, data_file: str | os.PathLike | None = None,
            loras: Sequence[str | os.PathLike] = (), tokenizer=None, template: str = D.TEMPLATE, with_prompt: bool = True,
            settings: GenerationSettings | None = None, batch_size: int = D.BATCH_SIZE, device: str = "auto",
            dtype: str | None = "auto", allow_vocab_jump: bool = False, echo=print) -> list[dict]:
    """inference_hf.py's batch mode: predictions JSON + generation_config.json beside it."""
    settings = (settings or GenerationSettings()).check()
    tpl = get_template(template, with_prompt)
    examples = read_examples(data_file) if data_file else [Example(s) for s in SAMPLE_DATA]
    out = Path(predictions_file)
    gen_config = out.parent / "generation_config.json"
    if out.name == gen_config.name:
        raise LlamaforgeError("the predictions file would be overwritten by generation_config.json", out,
                              "choose another name for the predictions file, e.g. predictions.json")
    inputs = [("model folder", model), ("prompts file", data_file), ("tokenizer folder", tokenizer)]
    inputs += [("adapter folder", p) for p in loras]
    guard_output(out, "predictions", inputs)
    guard_output(gen_config, "json", inputs, own=json_of_kind(PREDICT))
    if out.suffix.lower() != ".json":
        log.warning("%s: predictions are written as JSON", out)
    if data_file:
        echo("first 10 examples:")
        for ex in examples[:10]:
            echo(ex.instruction + (f"\n{ex.input}" if ex.input else ""))
    loaded = load_model(model, loras, tokenizer, device, dtype, allow_vocab_jump, echo=echo)
    gen = Generator(loaded, settings)
    tpl = bind_template(tpl, loaded.tokenizer, tokenizer or model)
    gen.add_special = not tpl.special_in_text
    prompts = [tpl.prompt(ex.instruction, ex.input) for ex in examples]
    echo(f"Start inference: {len(prompts)} prompt(s), batch size {batch_size}, "
         f"{'sampling' if settings.do_sample else 'greedy'}, {loaded.dtype} on {loaded.device}")
    outs = gen.generate(prompts, batch_size, progress=lambda d, n: log.info("generated %d/%d", d, n))
    records = []
    for i, (ex, g) in enumerate(zip(examples, outs)):
        echo(f"======={i}=======")
        echo(f"Input: {ex.instruction}" + (f"\n{ex.input}" if ex.input else "") + "\n")
        echo(f"Output: {g.text}\n")
        records.append({"instruction": ex.instruction, "input": ex.input, "prompt": g.prompt, "output": g.text})
    config = {"llamaforge": PREDICT, **settings.to_json(), "template": tpl.name, "with_prompt": with_prompt, "batch_size": batch_size,
              "dtype": str(loaded.dtype).replace("torch.", ""), "device": loaded.device, **loaded.sources}
    # write_json would sort the keys; the records keep inference_hf.py's field order
    with atomic_file(out, "w") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)
        f.write("\n")
    write_json(gen_config, config)
    echo(f"Wrote {len(records)} predictions to {out} and the settings to {gen_config}")
    return records


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

