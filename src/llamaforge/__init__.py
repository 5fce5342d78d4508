"""llamaforge: reproducible builds of LLaMA-family models with extended vocabularies.

The heavy imports (transformers, peft) are kept out of this package's import path on purpose:
the merge and export paths need only torch, safetensors and numpy (transformers and PEFT cost ~0.36 GB of RSS on import; docs/ARCHITECTURE.md).
"""

from .errors import LlamaforgeError

__version__ = "0.1.0"
__all__ = ["LlamaforgeError", "__version__"]
