"""The shared base of every stage: the model folder (`ModelFolder`), the family table, the tensor
table, the hyper-parameters and Meta's layout. Nothing here imports torch.

    folder.py       ModelFolder, TokenizerKind, read_hf_config: one typed description of a folder
    families.py     Family, FAMILIES, family_of: what differs between architectures, as data
    tensors.py      TensorName and the tensors' names in Hugging Face, Meta and GGUF; q/k permutation
    dims.py         LlamaDims, dims_from_config, rope_settings: hyper-parameters, checked
    meta_params.py  Meta's shards and params.json
"""

from .dims import LlamaDims, check_dims, dims_from_config, rope_settings  # noqa: F401
from .families import (  # noqa: F401
    FAMILIES,
    LLAMA,
    SUPPORTED_ARCHITECTURES,
    Family,
    by_meta,
    family_of,
    hf_order,
    meta_order,
)
from .folder import ModelFolder, Rope, Tokenizer, TokenizerKind, read_hf_config  # noqa: F401
from .meta_params import (  # noqa: F401
    META_SHARDS,
    check_shardable,
    config_from_dims,
    default_max_positions,
    default_num_shards,
    dims_from_params,
    ffn_params,
    meta_ffn_dim,
    params_from_dims,
    shard_ranges,
    split_sizes,
)
from .tensors import (  # noqa: F401
    BIASES,
    DERIVED_HF,
    DERIVED_META,
    EMBED,
    EMBED_HF,
    LAYER,
    LM_HEAD_HF,
    NORM,
    OUTPUT,
    TensorName,
    hf_tensor_order,
    permute_into,
)
