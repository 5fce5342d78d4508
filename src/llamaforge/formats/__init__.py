"""Tensor formats and the stream, the shared base of the merge and the exports.

    dtypes       safetensors <-> torch dtypes, TensorInfo, sizes ("5GB"), positioned reads
    safetensors  the strict safetensors reader and the sharded writer with its index
    pickles      PyTorch pickles (.bin, .pth) loaded without running code
    source       ModelSource: every tensor of a Hugging Face folder (the ModelFolder's tensor index)
    stream       the one streaming engine: BlockReader, Stage, HashingWriter, block_rows
    torch_zip    torch.save's zip format written tensor by tensor (the Meta export's sink)
"""
