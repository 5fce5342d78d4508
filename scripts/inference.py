#!/usr/bin/env python
"""Generate with a LLaMA model (+ PEFT adapters on the fly): a predictions file, or an interactive REPL.

Chinese-LLaMA-Alpaca's inference_hf.py, with its defaults (temperature 0.2, top_k 40, top_p 0.9,
repetition penalty 1.1, 400 new tokens, sampling, its prompt template), batched.

  python scripts/inference.py --model merged/demo --data-file prompts.txt --predictions-file out.json
  python scripts/inference.py --model resources/demo/base --lora LLAMA_PLUS --lora ALPACA_PLUS --interactive --chat
"""

import _pathfix  # noqa: F401  (this checkout's src/ first)
import click

from llamaforge import defaults as D
from llamaforge.cli import Command, setup_logging, user_errors
from llamaforge.generate import ORIGINAL_GENERATION as ORIG
from llamaforge.model.prompts import TEMPLATES


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Hugging Face model folder (merged, or the base of --lora).")
@click.option("--lora", "loras", multiple=True, type=click.Path(file_okay=False),
              help="PEFT adapter folder applied on the fly, in order (repeat: LLaMA-Plus, then Alpaca-Plus).")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Tokenizer folder. Default: the last --lora holding tokenizer.model or tokenizer.json, else --model.")
@click.option("--data-file", type=click.Path(dir_okay=False),
              help="Instructions: text (one a line), or .json/.jsonl Alpaca records (instruction + input).")
@click.option("--predictions-file", default="predictions.json", show_default=True, type=click.Path(dir_okay=False),
              help="Output JSON list of {instruction, input, prompt, output}; generation_config.json is written beside it.")
@click.option("--interactive", is_flag=True, help="Read instructions from stdin and answer each (an empty line exits).")
@click.option("--chat", is_flag=True, help="With --interactive: keep a multi-turn history within the context length.")
@click.option("--with-prompt/--no-prompt", default=True, show_default=True, help="Wrap each instruction in the prompt template.")
@click.option("--template", type=click.Choice(list(TEMPLATES)), default=D.TEMPLATE, show_default=True,
              help="auto: the tokenizer's chat template if it has one, else alpaca; chat: the tokenizer's chat template; "
                   "alpaca: inference_hf.py's template; alpaca-train: the training template; none: the text as is.")
@click.option("--batch-size", default=D.BATCH_SIZE, show_default=True, type=click.IntRange(min=1), help="Prompts generated together (left padded).")
@click.option("--max-new-tokens", default=ORIG["max_new_tokens"], show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=ORIG["temperature"], show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--top-p", default=ORIG["top_p"], show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=ORIG["top_k"], show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--repetition-penalty", default=ORIG["repetition_penalty"], show_default=True, type=click.FloatRange(min=0, min_open=True), help="1.0 = off.")
@click.option("--greedy", is_flag=True, help="Greedy decoding instead of sampling (batched output = one-at-a-time output).")
@click.option("--seed", type=int, default=None, help="Seed for sampling; the same seed, inputs and batch size give the same output.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Compute dtype; auto = float32 on the CPU, float16 on CUDA.")
@click.option("--allow-vocab-jump", is_flag=True,
              help="Allow an Alpaca-style adapter (vocabulary + [PAD]) straight on a smaller base (Chinese-Alpaca v1).")
def main(model, loras, tokenizer, data_file, predictions_file, interactive, chat, with_prompt, template, batch_size,
         max_new_tokens, temperature, top_p, top_k, repetition_penalty, greedy, seed, device, dtype, allow_vocab_jump):
    setup_logging()
    if chat and not interactive:
        raise click.UsageError("--chat needs --interactive")
    if interactive and data_file:
        raise click.UsageError("give either --data-file or --interactive, not both")
    with user_errors():
        from llamaforge.generate import GenerationSettings, interactive as run_interactive, predict

        settings = GenerationSettings(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=not greedy,
                                      repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed)
        common = dict(loras=list(loras), tokenizer=tokenizer, template=template, with_prompt=with_prompt,
                      settings=settings, device=device, dtype=dtype, allow_vocab_jump=allow_vocab_jump)
        if interactive:
            # input(): line editing on a terminal, plain readline on a pipe (EOF ends the session)
            run_interactive(model, chat=chat, read=input, echo=click.echo, **common)
        else:
            predict(model, predictions_file, data_file, batch_size=batch_size, echo=click.echo, **common)


if __name__ == "__main__":
    main()
