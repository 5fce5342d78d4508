"""GGUF quantization by llama.cpp's own quantizer, and the Ollama Modelfile beside each GGUF.

The 4-6 bit types people run (Q4_0 ... Q6_K, Q4_K_M above all) are made by llama.cpp itself:
llama-cpp-python's `llama_model_quantize` is the function `llama-quantize` calls, applied to
llamaforge's own F16 GGUF, so the tensors are byte-identical to `llama-quantize`'s of that file
(its output is deterministic). llama-cpp-python is the `gguf` extra; without it every other export
still builds and asking for one of these types is one line saying what to install.

K-quants work on rows that are a multiple of 256 values; llama.cpp quantizes other tensors with
another type (its fallback), which `fallbacks` reads back from the file so the user sees it.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

from .errors import LlamaforgeError
from .fsutil import owned_by, small_text_lines

# --outtype names (llama-quantize's, lower case) made by llama.cpp's quantizer
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k")
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


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str, threads: int = 0) -> None:
    """llama-quantize SRC DST OUTTYPE, in-process: `llama_model_quantize` with the default parameters
    (as the command line's) and the type's ftype."""
    if outtype not in LLAMA_CPP_TYPES:
        raise LlamaforgeError(f"unknown quantization type {outtype!r}", None, f"use one of {', '.join(LLAMA_CPP_TYPES)}")
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
    """{tensor name: (GGML type name, shape)} of a GGUF file."""
    import gguf

    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in gguf.GGUFReader(path).tensors}


def fallbacks(path: str | os.PathLike, outtype: str) -> list[tuple[str, str]]:
    """The 2-D tensors of a K-quant file that llama.cpp stored in a non-K type, because their rows
    are not a multiple of 256 (its fallback): [(name, type)]. Empty for the other types."""
    if not outtype.endswith(("_k", "_k_s", "_k_m", "_k_l")):
        return []
    return [(name, typ) for name, (typ, shape) in tensor_types(path).items()
            if len(shape) == 2 and typ not in K_QUANTS]


def type_summary(path: str | os.PathLike) -> str:
    """"Q4_K 154, Q6_K 29, F32 61" for a GGUF file."""
    counts = Counter(typ for typ, _ in tensor_types(path).values())
    return ", ".join(f"{t} {n}" for t, n in counts.most_common())


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile

# the TEMPLATE and stop strings of each prompt format, and prompt_format, are llamaforge.prompts'
from .prompts import modelfile_template, prompt_format  # noqa: E402


MODELFILE_HEADER = "# llamaforge Modelfile: {name} for Ollama (ollama create NAME -f this file)"


def check_gguf_name(path: str | os.PathLike) -> str:
    """The GGUF's file name as the Modelfile's `FROM ./NAME` may hold it. Ollama's Modelfile has no
    escape: a line break in the name would add instructions, a quote or edge space changes how
    Ollama reads the value. Such names are refused, before anything is read or written."""
    name = Path(path).name
    bad = [c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") or c == '"']
    if bad or name != name.strip():
        what = f"the character {ascii(bad[0])}" if bad else "a space at its start or end"
        raise LlamaforgeError(f"the GGUF file name holds {what}, which an Ollama Modelfile's FROM line cannot carry "
                              "(it would change or add Modelfile instructions)", path,
                              "name the GGUF with printable characters only, no quotes (e.g. NAME-q4_k_m.gguf)")
    return name


def modelfile_text(gguf_name: str, chat_template: str | None, settings: dict) -> str:
    """An Ollama Modelfile: FROM ./{gguf}, the TEMPLATE of the model's prompt format (Go template
    syntax, as Ollama's own library writes them), its stop strings, and generation parameters."""
    check_gguf_name(gguf_name)
    settings = check_parameters(settings)
    fmt = prompt_format(chat_template)
    template, stops = modelfile_template(fmt)
    lines = [MODELFILE_HEADER.format(name=gguf_name), f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    for key in MODELFILE_PARAMETERS:  # Ollama's names
        if settings.get(key) is not None:
            lines.append(f"PARAMETER {key} {settings[key]}")
    return "\n".join(lines) + "\n"


_HEADER_RE = re.compile(re.escape(MODELFILE_HEADER).replace(re.escape("{name}"), r"[^\n]+"))


@owned_by("modelfile", "Ollama Modelfile")
def is_own_modelfile(path: Path) -> bool:
    """A Modelfile as modelfile_text writes it, whole: the header line, then only FROM, TEMPLATE
    \"\"\"...\"\"\" and PARAMETER lines of the names it writes. A file that merely starts like it (notes
    titled "# llamaforge ...", a Modelfile the user added a SYSTEM line to) is not llamaforge's."""
    lines = small_text_lines(path, 1 << 20)
    if not lines or not _HEADER_RE.fullmatch(lines[0]) or lines[-1] != "":
        return False
    i, froms, templates = 1, 0, 0
    while i < len(lines) - 1:
        line = lines[i]
        if line.startswith("FROM ./") and len(line) > 7:
            froms += 1
        elif line.startswith('TEMPLATE """'):
            templates += 1
            rest = line[len('TEMPLATE """'):]
            while not rest.endswith('"""'):  # the template runs on to the line that closes it
                i += 1
                if i >= len(lines) - 1:
                    return False
                rest = lines[i]
        elif not re.fullmatch(r'PARAMETER (stop "[^"\n]+"|(%s) -?[0-9][0-9.e+-]*)' % "|".join(MODELFILE_PARAMETERS),
                              line):
            return False
        i += 1
    return froms == 1 and templates == 1


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    p = Path(gguf_path)
    return p.with_name(p.stem + ".Modelfile")


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
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    nbytes = sum(int(t.n_bytes) for t in tensors)
    n = sum(int(t.n_elements) for t in tensors)
    return 8 * nbytes / n, nbytes, n


def write_modelfile(gguf_path: str | os.PathLike, settings: dict, output: str | os.PathLike | None = None) -> Path:
    """{stem}.Modelfile beside a GGUF (or `output`), its TEMPLATE from the GGUF's own
    tokenizer.chat_template (which llamaforge always writes)."""
    import gguf

    from .fsutil import atomic_file, guard_output, require_regular_file

    src = Path(gguf_path)
    check_gguf_name(src)
    settings = check_parameters(settings)
    out = Path(output) if output is not None else modelfile_path(src)
    guard_output(out, "modelfile", [("GGUF file", src)])
    require_regular_file(src, "the GGUF file", "give the .gguf file that scripts/export_gguf.py wrote")
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise LlamaforgeError(f"not a GGUF file ({str(e)[:100]})", src, "export the model to GGUF again") from None
    template = gguf_string(reader, "tokenizer.chat_template", src)
    with atomic_file(out, "w") as f:
        f.write(modelfile_text(src.name, template, settings))
    return out


MODELFILE_PARAMETERS = ("temperature", "top_k", "top_p", "repeat_penalty", "num_predict", "seed")


# Ollama's types and ranges of these parameters (api/types.go Options, docs/modelfile.md): integers
# are Go ints (64 bits), floats Go float32s; the ranges are those the runner gives a meaning.
_F32_MAX = 3.4028234663852886e38
_INT_RANGES = {"top_k": (0, 2**63 - 1, "0 or more"), "num_predict": (-2, 2**63 - 1, "-2 (fill the context), -1 "
               "(no limit) or more"), "seed": (-(2**63), 2**63 - 1, "a 64-bit integer")}
_FLOAT_RANGES = {"temperature": (0.0, _F32_MAX, "a finite number, 0 or more"),
                 "top_p": (0.0, 1.0, "between 0 and 1"),
                 "repeat_penalty": (0.0, _F32_MAX, "a finite number, 0 or more")}


def parameter_problem(key: str, value) -> str | None:
    """What is wrong with Modelfile PARAMETER `key` = `value` by Ollama's type and range, or None."""
    if key in _INT_RANGES:
        lo, hi, text = _INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} is {value!r}; it must be an integer, {text}"
    elif key in _FLOAT_RANGES:
        lo, hi, text = _FLOAT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is {value!r}; it must be a number, {text}"
        if not math.isfinite(value):
            return f"{key} is {value}; it must be {text}"
    else:
        return f"{key} is not a Modelfile parameter llamaforge writes ({', '.join(MODELFILE_PARAMETERS)})"
    if not lo <= value <= hi:
        return f"{key} is {value}; it must be {text}"
    return None


def check_parameters(settings: dict) -> dict:
    """`settings` (Modelfile parameters by Ollama's names, None for unset) if each is of Ollama's type
    and range; else one error naming the first that is not."""
    for key, value in (settings or {}).items():
        if value is not None and (problem := parameter_problem(key, value)):
            raise LlamaforgeError(f"Modelfile parameter {problem}", None,
                                  "give Ollama a value it accepts (see Ollama's Modelfile documentation, PARAMETER)")
    return settings or {}


def parse_parameters(ctx, param, values) -> dict:
    """Click callback of --parameter KEY=VALUE (Ollama's names), repeatable; each checked by Ollama's
    type and range."""
    import click

    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or key not in MODELFILE_PARAMETERS:
            raise click.BadParameter(f"{v!r}: give KEY=VALUE with KEY one of {', '.join(MODELFILE_PARAMETERS)}")
        try:
            out[key] = int(value, 10) if key in _INT_RANGES else float(value)
        except ValueError:
            raise click.BadParameter(f"{v!r}: {value!r} is not {'an integer' if key in _INT_RANGES else 'a number'}") \
                from None
        if problem := parameter_problem(key, out[key]):
            raise click.BadParameter(f"{v!r}: {problem}")
    return out


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
