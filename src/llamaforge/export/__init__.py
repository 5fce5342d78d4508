"""The exports of a model folder, and the Meta import.

    source       the model folder checked for export, and the tensor stream (reads, q/k, offsets)
    pth          Meta's consolidated.NN.pth + params.json + tokenizer.model
    gguf         the GGUF export (F16, BF16, Q8_0 here; llama.cpp's types from the F16)
    gguf_meta    the GGUF's metadata and tensor types as llama.cpp's converter writes them
    gguf_write   the GGUF sink: header by gguf-py, tensor data block by block
    gguf_vocab   gguf-py's SpecialVocab as llama.cpp's converter has it
    gguf_check   a GGUF against the model it claims to be (--from-f16)
    quantize     llama.cpp's quantizer and loader
    modelfile    the Ollama Modelfile
    meta_import  Meta's consolidated.NN.pth folders into Hugging Face folders

Nothing here imports torch at import time: a quantization from an F16 GGUF never does.
"""

from .gguf import export_gguf  # noqa: F401
from .pth import export_pth  # noqa: F401
from .source import describe_model, open_model  # noqa: F401
