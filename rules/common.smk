# Input functions, wildcard constraints and resources shared by every stage.
#
# Paths in config.yaml are relative to the repository root (where snakemake runs). Inputs are
# declared file by file, not as folders: Snakemake compares a folder by its own timestamp, so a
# changed adapter_model.safetensors inside an unchanged folder would otherwise go unnoticed.

import sys
from pathlib import Path

# The workflow reads the demo's file list from the package in this checkout (scripts do the same
# through scripts/_pathfix.py), so it works before `pip install -e .` too.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from llamaforge.demo import demo_files  # noqa: E402


wildcard_constraints:
    name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


DEMO_DIR = "resources/demo"
DEMO_OUTPUTS = [f"{DEMO_DIR}/{f}" for f in demo_files()] if config["demo"]["enabled"] else []

# Files that describe a model, a tokenizer or an adapter folder (weights are globbed separately).
META_FILES = (
    "config.json", "generation_config.json", "params.json", "adapter_config.json",
    "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
)
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth")


def folder_files(folder):
    """The files of an input folder, for use as rule inputs.

    A folder that another rule builds (tokenizers/*, merged/*, the demo) is returned as the
    rule's outputs; a user's folder is listed from disk; a missing one is returned as-is so
    Snakemake reports it as a missing input.
    """
    folder = str(folder).rstrip("/")
    produced = [f for f in DEMO_OUTPUTS if f.startswith(f"{folder}/")]
    if produced:
        return produced
    if folder.startswith(("tokenizers/", "merged/", "imported/")):
        return [folder]
    p = Path(folder)
    if not p.is_dir():
        return [folder]
    files = sorted(
        str(f)
        for f in p.iterdir()
        if f.is_file() and (f.name in META_FILES or any(f.match(g) for g in WEIGHT_GLOBS))
    )
    return files or [folder]


def produced_by_workflow(path):
    """True when the workflow builds `path` (or the folder holding it), as the demo's files, a configured
    tokenizer, a merge or an import do. Such paths need not exist when the workflow is parsed."""
    path = str(path).rstrip("/")
    if path in DEMO_OUTPUTS or any(f.startswith(f"{path}/") for f in DEMO_OUTPUTS):
        return True
    parts = Path(path).parts
    if len(parts) >= 2 and parts[0] == "tokenizers":
        return parts[1] in config["tokenizers"]
    return len(parts) >= 2 and parts[0] in ("merged", "imported") and parts[1] in config["models"]


def configured_inputs():
    """(config key, path, 'file' or 'folder') of every user input that config.yaml names."""
    found = []
    for name, t in config["tokenizers"].items():
        found += [(f"tokenizers.{name}.base", t["base"], "file"), (f"tokenizers.{name}.extra", t["extra"], "file")]
    for name, m in config["models"].items():
        found.append((f"models.{name}.base", m["base"], "folder"))
        found += [(f"models.{name}.loras[{i}]", p, "folder") for i, p in enumerate(m["loras"])]
        if m["tokenizer"]:
            found.append((f"models.{name}.tokenizer", m["tokenizer"], "folder"))
    ev = config["eval"]
    for key, value in (("eval.prompts", ev["prompts"]), ("eval.text", ev["text"]),
                       ("eval.equivalence.prompts", ev["equivalence"]["prompts"])):
        if value:
            found.append((key, value, "file"))
    return found


def check_config_paths():
    """Stop, while the workflow is parsed (also for -n, and when the outputs exist already), at the
    first configured input that is missing: Snakemake deletes a job's outputs before it runs, so a
    job that then fails on a bad input would cost the user the previous good output."""
    for key, path, kind in configured_inputs():
        if produced_by_workflow(path):
            continue
        p = Path(path)
        ok = p.is_dir() if kind == "folder" else p.is_file()
        if not ok:
            what = "does not exist" if not p.exists() else f"is not a {kind}"
            sys.exit(f"llamaforge: error: config.yaml: {key}: {path} {what}. "
                     f"Fix: correct the path under {key.split('.')[0]}: in config.yaml (paths are relative to "
                     f"{Path.cwd()}), or create the {kind}.")


check_config_paths()


def tokenizer_cfg(name):
    try:
        return config["tokenizers"][name]
    except KeyError:
        raise ValueError(
            f"config.yaml: no tokenizer named {name!r} under 'tokenizers:'; defined: {sorted(config['tokenizers'])}"
        )


def model_cfg(name):
    try:
        return config["models"][name]
    except KeyError:
        raise ValueError(
            f"config.yaml: no model named {name!r} under 'models:'; defined: {sorted(config['models'])}"
        )


def is_meta_folder(folder):
    """A Meta checkpoint folder (consolidated.NN.pth + params.json) rather than a Hugging Face one."""
    p = Path(folder)
    return (p / "params.json").is_file() or any(p.glob("consolidated.*.pth"))


def model_base_dir(name):
    """The Hugging Face folder a model merges from: its base, or the conversion of a Meta base."""
    base = model_cfg(name)["base"]
    return f"imported/{name}" if is_meta_folder(base) else base


def all_targets():
    targets = [f"tokenizers/{name}" for name in config["tokenizers"]]
    targets += [f"merged/{name}" for name in config["models"]]
    targets += export_targets()
    targets += eval_targets()
    return targets


def input_mb(input):
    """Megabytes of a job's input files (folders summed), for runtime estimates."""
    total = 0
    for f in input:
        p = Path(f)
        if p.is_dir():
            total += sum(x.stat().st_size for x in p.rglob("*") if x.is_file())
        elif p.is_file():
            total += p.stat().st_size
    return total // 2**20


def shell_quote(text):
    import shlex

    return shlex.quote(str(text))


def merge_mem_mb(wildcards, input):
    # Bounded by the largest tensor, not the model: the tensor being merged, the one read ahead,
    # the one being written and its float32 row blocks, plus the interpreter and torch (~0.5 GB).
    from llamaforge.formats import largest_tensor_bytes

    largest = largest_tensor_bytes(list(input.base) + list(input.loras))
    return 768 + 5 * largest // 2**20
