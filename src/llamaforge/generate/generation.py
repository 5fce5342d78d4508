"""Batched generation with left padding (identical token ids per prompt under greedy decoding),
and inference_hf.py's batch mode (`predict`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from .. import defaults as D
from ..errors import LlamaforgeError
from ..files.atomic import atomic_file, write_json
from ..files.guard import json_or_none, guard_output, json_of_kind, owned_by
from ..model.prompts import bind_template, get_template
from .instructions import SAMPLE_DATA, Example, read_examples
from .loading import Loaded, load_model

log = logging.getLogger(__name__)

PREDICT = "predict"  # the "llamaforge" value of generation_config.json written beside predictions
PREDICTION_FIELDS = frozenset({"instruction", "input", "prompt", "output"})  # of each record predict writes


@owned_by("predictions", "predictions file")
def _is_own_predictions(path: Path) -> bool:
    """A JSON list of records with exactly the fields predict writes."""
    data = json_or_none(path)
    return isinstance(data, list) and all(isinstance(x, dict) and set(x) == PREDICTION_FIELDS for x in data)

#: inference_hf.py's generation_config (the later release, with repetition_penalty 1.1).
ORIGINAL_GENERATION = dict(temperature=0.2, top_k=40, top_p=0.9, do_sample=True, num_beams=1,
                           repetition_penalty=1.1, max_new_tokens=400)


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
