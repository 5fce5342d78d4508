"""The LoRA merge: ordered PEFT adapters streamed into a base's weights.

    lora    PEFT adapters: keys, scales, and the arithmetic on blocks of rows
    plan    what each output tensor starts from and which updates apply, checked before writing
    merger  the streaming merge (read, apply, cast, write and hash, in their own threads)
    run     merge_lora: the base (a ModelFolder), the tokenizer, the manifest, the atomic output
"""

from .run import merge_lora  # noqa: F401
