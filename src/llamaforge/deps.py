"""Which files of this checkout a script runs: the script, scripts/_pathfix.py and the import
closure of the `llamaforge` package modules it reaches, read with `ast` (imports deferred into
functions included), so the workflow declares exactly those as a rule's inputs and an edit of
any of them reruns exactly the jobs that run it.

Only this package is followed; third-party imports are the environment's business
(`envs/*.yaml`). Nothing is imported or executed to find the closure.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = "llamaforge"


def _module_file(pkg_dir: Path, dotted: str) -> Path | None:
    """src/llamaforge/a/b.py (or a/b/__init__.py) for 'a.b' inside the package, if it exists."""
    base = pkg_dir.joinpath(*dotted.split(".")) if dotted else pkg_dir
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, pkg_dir: Path) -> set[Path]:
    """The package modules `path` imports anywhere in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_pkg = path.resolve().is_relative_to(pkg_dir.resolve())
    here = ".".join(path.resolve().relative_to(pkg_dir.resolve()).with_suffix("").parts[:-1]) if in_pkg else ""
    found: set[Path] = set()

    def add(dotted: str) -> None:
        # importing a.b.c runs the package's __init__ and every parent package on the way
        parts = dotted.split(".") if dotted else []
        for i in range(len(parts) + 1):
            f = _module_file(pkg_dir, ".".join(parts[:i]))
            if f is not None:
                found.add(f)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name[len(PACKAGE) + 1:])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative, inside the package
                if not in_pkg:
                    continue
                parts = here.split(".") if here else []
                parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                mod = ".".join(parts + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                mod = node.module[len(PACKAGE) + 1:]
            else:
                continue
            add(mod)
            for alias in node.names:  # `from llamaforge import merge` imports a submodule
                sub = f"{mod}.{alias.name}" if mod else alias.name
                if _module_file(pkg_dir, sub) is not None and alias.name != "*":
                    add(sub)
    return found


@lru_cache(maxsize=None)
def _closure(script: Path, pkg_dir: Path) -> tuple[Path, ...]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        for m in _imports(f, pkg_dir):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return tuple(sorted(seen))


def script_closure(script: str | Path, root: str | Path = ".") -> list[str]:
    """The script, scripts/_pathfix.py when it imports it, and every package module it can run,
    as paths relative to `root` (the workflow's folder), sorted."""
    root = Path(root)
    script = Path(script)
    path = script if script.is_absolute() else root / script
    pkg_dir = root / "src" / PACKAGE
    out = [script.as_posix()]
    pathfix = path.parent / "_pathfix.py"
    if pathfix.is_file() and "_pathfix" in path.read_text(encoding="utf-8"):
        out.append((script.parent / "_pathfix.py").as_posix())
    out += [m.relative_to(root).as_posix() for m in _closure(path, pkg_dir)]
    return out
