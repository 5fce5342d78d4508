"""llama.cpp's quantizer (through llama-cpp-python, built from the same pinned source) and what a
quantized GGUF holds: its types, fallbacks and bits per weight; `open_llama` loads a GGUF in llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter

from ..errors import LlamaforgeError

# --outtype names (llama-quantize's, lower case) made by llama.cpp's quantizer
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k", "q2_k_s", "iq4_xs", "iq4_nl", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs",
                   "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")

# The types llama.cpp will not make without an importance matrix: their files hold tensors of a
# type that llama-quant.cpp's tensor_requires_imatrix names (IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS; Q2_K
# in a Q2_K_S file); IQ3_XS puts IQ3_XXS in its attention, IQ2_M is IQ2_S.
NEEDS_IMATRIX = ("q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


INSTALL = "pip install 'llamaforge[gguf]' (llama-cpp-python; it compiles llama.cpp once, 10-20 minutes)"


def load_llama_cpp(outtype: str):
    """llama_cpp, or one clear error naming what to install."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaforgeError(f"--outtype {outtype} is made by llama.cpp's quantizer, and llama-cpp-python is not "
                              "installed", None, INSTALL) from None
    return llama_cpp


def check_imatrix_need(outtype: str, imatrix: str | os.PathLike | None) -> None:
    """One line, before any work, when `outtype` is one llama.cpp will not make without an imatrix."""
    if outtype in NEEDS_IMATRIX and imatrix is None:
        raise LlamaforgeError(f"llama.cpp makes {outtype} only with an importance matrix", None,
                              "give --imatrix FILE.imatrix.gguf (scripts/imatrix.py makes one; in the workflow: "
                              "models.NAME.imatrix), or choose a type such as iq4_xs, q4_k_m")


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str, threads: int = 0,
                  imatrix: str | os.PathLike | None = None) -> None:
    """llama-quantize SRC DST OUTTYPE, in-process: `llama_model_quantize` with the default parameters
    (as the command line's) and the type's ftype. With an importance matrix: llama.cpp's own
    llama-quantize --imatrix (the binding cannot pass one), with its quantize.imatrix.* keys."""
    if outtype not in LLAMA_CPP_TYPES:
        raise LlamaforgeError(f"unknown quantization type {outtype!r}", None, f"use one of {', '.join(LLAMA_CPP_TYPES)}")
    check_imatrix_need(outtype, imatrix)
    if imatrix is not None:
        from .tools import run_tool

        args = ["--imatrix", imatrix, src, dst, outtype.upper()] + ([str(int(threads))] if threads else [])
        run_tool("llama-quantize", args, f"quantizing to {outtype} with an importance matrix", src,
                 "check that the F16 GGUF and the imatrix are of the same model (scripts/imatrix.py), and the disk")
        return
    llama_cpp = load_llama_cpp(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = int(threads)
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise LlamaforgeError(f"llama.cpp's quantizer failed (return code {rc}); its log is above", src,
                              "check that the F16 GGUF loads in llama.cpp, and that the disk has room")


def gguf_file_type(reader) -> int | None:
    """general.file_type of an open gguf.GGUFReader."""
    f = reader.fields.get("general.file_type")
    return int(f.parts[-1][0]) if f is not None else None


def tensor_types(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (GGML type name, shape)} of a GGUF file (its tensor table only: formats.gguf_tensors)."""
    return {t.name: (t.type_name, t.shape) for t in _tensor_table(path)}


def header_scalars(path: str | os.PathLike) -> dict:
    """The scalar keys of a GGUF (formats.gguf_tensors: strings as bytes, no arrays), read past its
    arrays; {} for a file that reader cannot walk."""
    from ..formats.gguf_tensors import GGUFHeaderError, read_header

    try:
        return read_header(path).scalars
    except GGUFHeaderError:
        return {}


def header_string(path: str | os.PathLike, key: str) -> str | None:
    """The string value of GGUF key `key` (None when absent), from the header's scalars; a value of
    another type or not UTF-8 gets gguf_string's one-line error."""
    value = header_scalars(path).get(key)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        import gguf

        return gguf_string(gguf.GGUFReader(path), key, path)


def _tensor_table(path: str | os.PathLike) -> list:
    """The GGUF's tensor infos, read past its metadata values (tens of ms where gguf-py's reader
    takes seconds on a large vocabulary); a file that reader cannot walk goes to gguf-py's, whose
    errors the callers already expect."""
    from ..formats.gguf_tensors import GGUFHeaderError, GGUFTensor, read_tensor_table

    try:
        return read_tensor_table(path)
    except GGUFHeaderError:
        import gguf

        r = gguf.GGUFReader(path)
        return [GGUFTensor(t.name, int(t.tensor_type), tuple(int(x) for x in t.shape),
                           int(t.data_offset) - int(r.data_offset)) for t in r.tensors]


def fallbacks(path: str | os.PathLike, outtype: str, types: dict | None = None) -> list[tuple[str, str]]:
    """The 2-D tensors of a K-quant file that llama.cpp stored in a non-K type, because their rows
    are not a multiple of 256 (its fallback): [(name, type)]. Empty for the other types. `types`:
    the file's tensor_types, when the caller read them already (a GGUF's header is slow to parse)."""
    if not outtype.endswith(("_k", "_k_s", "_k_m", "_k_l")):
        return []
    return [(name, typ) for name, (typ, shape) in (types or tensor_types(path)).items()
            if len(shape) == 2 and typ not in K_QUANTS]


def type_summary(path: str | os.PathLike, types: dict | None = None) -> str:
    """"Q4_K 154, Q6_K 29, F32 61" for a GGUF file (`types`: its tensor_types, if read already)."""
    counts = Counter(typ for typ, _ in (types or tensor_types(path)).values())
    return ", ".join(f"{t} {n}" for t, n in counts.most_common())


def open_llama(path: str | os.PathLike, **kw):
    """llama_cpp.Llama on a GGUF with llama.cpp's extra buffer types off: their weight repacking
    (AMX on recent Xeons) has been seen to segfault on Q8_0/Q4 files in virtual machines; the plain
    CPU kernels compute the same model."""
    llama_cpp = load_llama_cpp("(the quality table)")
    import llama_cpp.llama as ll

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    ll.llama_cpp.llama_model_default_params = params
    try:
        return ll.Llama(model_path=os.fspath(path), verbose=False, **kw)
    finally:
        ll.llama_cpp.llama_model_default_params = default


def bits_per_weight(path: str | os.PathLike) -> tuple[float, int, int]:
    """(bits per weight, tensor data bytes, weights) of a GGUF: its tensors' bytes over their values."""
    tensors = _tensor_table(path)
    nbytes = sum(t.n_bytes for t in tensors)
    n = sum(t.n_elements for t in tensors)
    return 8 * nbytes / n, nbytes, n


def gguf_string(reader, key: str, path: str | os.PathLike) -> str | None:
    """The string value of GGUF key `key` (None when absent); a value of another type, or bytes that
    are not UTF-8, is one clear error."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        kind = "/".join(t.name.lower() for t in field.types) or "no value"
        raise LlamaforgeError(f"the GGUF's {key} is a {kind}, not a string", path,
                              "export the model to GGUF again with scripts/export_gguf.py")
    try:
        return bytes(field.parts[-1]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"the GGUF's {key} is not UTF-8 text (byte {e.start})", path,
                              "export the model to GGUF again with scripts/export_gguf.py") from None
