"""The Ollama Modelfile beside a GGUF: FROM, the prompt template of prompts.py in Go form with its
stop strings, and the generation parameters checked by Ollama's own types and ranges; and its
ownership mark (the header line).
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path

from ..errors import LlamaforgeError
from ..files.guard import owned_by
from ..files.reading import small_text_lines
from ..model.prompts import modelfile_template, prompt_format
from .quantize import gguf_string

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


def write_modelfile(gguf_path: str | os.PathLike, settings: dict, output: str | os.PathLike | None = None) -> Path:
    """{stem}.Modelfile beside a GGUF (or `output`), its TEMPLATE from the GGUF's own
    tokenizer.chat_template (which llamaforge always writes)."""
    import gguf

    from ..files.atomic import atomic_file
    from ..files.guard import guard_output
    from ..files.reading import require_regular_file

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
