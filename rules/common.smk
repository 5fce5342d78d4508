# Input functions, wildcard constraints and resources shared by every stage.
#
# Paths in config.yaml are relative to the repository root (where snakemake runs). Inputs are
# declared file by file, not as folders: Snakemake compares a folder by its own timestamp, so a
# changed adapter_model.safetensors inside an unchanged folder would otherwise go unnoticed.

import importlib
import re
import runpy
import sys
from pathlib import Path

# The workflow imports the package from this checkout, as every script does, through the one
# mechanism for it (scripts/_pathfix.py), so it works before `pip install -e .` too.
runpy.run_path(str(Path(workflow.basedir) / "scripts" / "_pathfix.py"))

from llamaforge.demo import demo_files  # noqa: E402
from llamaforge.deps import script_closure  # noqa: E402
from llamaforge.formats.safetensors import largest_tensor_bytes  # noqa: E402
from llamaforge.export.meta_import import find_tokenizer  # noqa: E402
from llamaforge.export.quantize import LLAMA_CPP_TYPES, NEEDS_IMATRIX  # noqa: E402
from llamaforge.export import tools as llama_tools  # noqa: E402


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
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
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
        found.append((f"tokenizers.{name}.base", t["base"], "folder" if Path(t["base"]).is_dir() else "file"))
        if t["extra"]:
            found.append((f"tokenizers.{name}.extra", t["extra"], "file"))
    for name, m in config["models"].items():
        found.append((f"models.{name}.base", m["base"], "folder"))
        found += [(f"models.{name}.loras[{i}]", p, "folder") for i, p in enumerate(m["loras"])]
        if m["tokenizer"]:
            found.append((f"models.{name}.tokenizer", m["tokenizer"], "folder"))
        if m.get("imatrix") and m["imatrix"].get("text"):
            found.append((f"models.{name}.imatrix.text", m["imatrix"]["text"], "file"))
    ev = config["eval"]
    for key, value in (("eval.prompts", ev["prompts"]), ("eval.text", ev["text"]),
                       ("eval.equivalence.prompts", ev["equivalence"]["prompts"])):
        if value:
            found.append((key, value, "file"))
    for name, s in ev["multiple_choice"].items():
        found += [(f"eval.multiple_choice.{name}.{k}", s[k], "file") for k in ("data", "dev") if s.get(k)]
    return found


def built_folders():
    """(folder, whose) of every folder the workflow builds as one directory output: Snakemake deletes
    such a folder, with everything in it, before the job that builds it runs."""
    out = [(f"tokenizers/{n}", f"tokenizers.{n}") for n in config["tokenizers"]]
    for n in config["models"]:
        out += [(f"merged/{n}", f"models.{n}"), (f"imported/{n}", f"models.{n}"), (f"exports/{n}/pth", f"models.{n}")]
    return out


def check_not_in_built_folder(key, path):
    """A configured input may be a folder the workflow builds (a merged tokenizer as a model's
    tokenizer), but not lie inside one, hold one, or be its own entry's output: building that folder
    would delete it."""
    if path in DEMO_OUTPUTS:
        return
    p = Path(path).resolve()
    for folder, whose in built_folders():
        f = Path(folder).resolve()
        own = key.startswith(f"{whose}.")
        if p == f and not own:
            continue
        rel = "is" if p == f else "lies inside" if p.is_relative_to(f) else "holds" if f.is_relative_to(p) else None
        if rel:
            sys.exit(f"llamaforge: error: config.yaml: {key}: {path} {rel} {folder}, which the workflow builds for "
                     f"{whose}; Snakemake deletes that folder before building it, so this input would be lost. "
                     f"Fix: move it out of {folder} (e.g. to resources/) and point {key} at the new place.")


def check_config_paths():
    """Stop, while the workflow is parsed (also for -n, and when the outputs exist already), at the
    first configured input that is missing, or that lies inside a folder the workflow builds:
    Snakemake deletes a job's outputs before it runs, so a job that then fails on a bad input
    would cost the user the previous good output, and an input inside an output would be gone."""
    for key, path, kind in configured_inputs():
        check_not_in_built_folder(key, str(path).rstrip("/"))
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


def script_inputs(script):
    """A rule's code inputs: {"script": the script, "lib": scripts/_pathfix.py and every package
    module the script can import (llamaforge.deps, deferred imports included)}, so an edit of any
    of them reruns the rule's jobs and nothing else. Use as `input: unpack(script_inputs(...))`
    or take the two values."""
    files = script_closure(script, workflow.basedir)
    return {"script": files[0], "lib": files[1:]}


def script_lib(script):
    """The `lib=` input of a rule that runs `script` (see script_inputs)."""
    return script_inputs(script)["lib"]


def repeated_option(option, key):
    """A params function: `--OPTION FILE` for each file of the job's input `key` (quoted), joined."""

    def option_per_input(wildcards, input):
        return " ".join(f"--{option} {shell_quote(f)}" for f in input[key])

    return option_per_input


# ---- demo ---------------------------------------------------------------------------------------


def demo_outdir(wildcards, output):
    """The folder the demo is written to (resources/demo), from its first output."""
    return str(Path(output[0]).parent.parent)


# ---- tokenizers ---------------------------------------------------------------------------------


def tokenizer_base(wildcards):
    """A tokenizer's base as configured (a SentencePiece model or a tokenizer folder)."""
    return tokenizer_cfg(wildcards.name)["base"]


def tokenizer_base_files(wildcards):
    """The files of a tokenizer's base, as rule inputs."""
    return folder_files(tokenizer_base(wildcards))


def tokenizer_extra_file(wildcards):
    """A tokenizer's extra SentencePiece model, or no input when it has none."""
    return tokenizer_cfg(wildcards.name)["extra"] or []


def tokenizer_extra_flag(wildcards):
    """`--extra FILE` of merge_tokenizers.py, or nothing without an extra model."""
    extra = tokenizer_cfg(wildcards.name)["extra"]
    return f"--extra {shell_quote(extra)}" if extra else ""


def tokenizer_add_token_flags(wildcards):
    """`--add-token TOKEN` for each of a tokenizer's add_tokens."""
    return " ".join(f"--add-token {shell_quote(t)}" for t in tokenizer_cfg(wildcards.name)["add_tokens"])


# ---- merge --------------------------------------------------------------------------------------


def model_setting(key):
    """A params function: the model's `key` in config.yaml (dtype, device, max_shard_size, ...)."""

    def setting(wildcards):
        return model_cfg(wildcards.model)[key]

    return setting


def base_dir(wildcards):
    """The Hugging Face folder a model merges from (see model_base_dir)."""
    return model_base_dir(wildcards.model)


def base_dir_files(wildcards):
    """The files of the Hugging Face folder a model merges from, as rule inputs."""
    return folder_files(model_base_dir(wildcards.model))


def lora_files(wildcards):
    """The files of a model's adapters, in order, as rule inputs."""
    return [f for lora in model_cfg(wildcards.model)["loras"] for f in folder_files(lora)]


def lora_flags(wildcards):
    """`--lora FOLDER` for each of a model's adapters, in order."""
    return " ".join(f"--lora {shell_quote(lora)}" for lora in model_cfg(wildcards.model)["loras"])


def model_tokenizer_files(wildcards):
    """The files of a model's tokenizer folder, or no input when it keeps the base's."""
    tokenizer = model_cfg(wildcards.model)["tokenizer"]
    return folder_files(tokenizer) if tokenizer else []


def model_tokenizer_flag(wildcards):
    """`--tokenizer FOLDER` of merge_lora.py, or nothing when the model keeps the base's tokenizer."""
    tokenizer = model_cfg(wildcards.model)["tokenizer"]
    return f"--tokenizer {shell_quote(tokenizer)}" if tokenizer else ""


def merge_runtime(wildcards, input):
    """Minutes of a merge: 10, plus one per 200 MB of input."""
    return 10 + input_mb(input) // 200


def merge_gpu(wildcards):
    """GPUs a merge asks for: 1 with `device: cuda`."""
    return 1 if model_cfg(wildcards.model)["device"] == "cuda" else 0


def merged_model_files(wildcards):
    """The files of merged/{model}, as rule inputs (of the exports and the evaluation)."""
    return folder_files(f"merged/{wildcards.model}")


def configured_base(wildcards):
    """A model's base as configured (a Meta base is read as such, not as its import)."""
    return model_cfg(wildcards.model)["base"]


def configured_base_files(wildcards):
    """The files of a model's base folder as configured, as rule inputs."""
    return folder_files(configured_base(wildcards))


# ---- crawl --------------------------------------------------------------------------------------


def crawl_setting(key):
    """A params function: the crawl's `key` in config.yaml (model, num_requests, seed, ...)."""

    def setting(wildcards):
        return config["crawl"][wildcards.name][key]

    return setting


def crawl_base_url_flag(wildcards):
    """`--base-url URL` of crawl_prompts.py, or nothing for $OPENAI_BASE_URL / OpenAI's."""
    url = config["crawl"][wildcards.name]["base_url"]
    return f"--base-url {shell_quote(url)}" if url else ""


def crawl_runtime(wildcards):
    """Minutes of a crawl: a reply of 20 items takes about a minute; two per request and slot, plus 30."""
    c = config["crawl"][wildcards.name]
    return 30 + 2 * -(-c["num_requests"] // c["concurrency"])


# ---- exports and the Meta import ---------------------------------------------------------------


def export_files(name):
    """The export files of one model, per its `exports:` list (hf = merged/{model} itself)."""
    return [
        {"hf": f"merged/{name}", "pth": f"exports/{name}/pth"}.get(e, f"exports/{name}/{name}-{e[5:]}.gguf")
        for e in model_cfg(name)["exports"]
    ]


def modelfile_files(name):
    """The Ollama Modelfile beside each of a model's GGUF exports."""
    return [f[: -len(".gguf")] + ".Modelfile" for f in export_files(name) if f.endswith(".gguf")]


def modelfile_parameters(wildcards):
    """--parameter options of a GGUF's Ollama Modelfile: the evaluation's generation settings under
    Ollama's names (greedy: temperature 0)."""
    g = config["eval"]["generation"]
    pairs = {"temperature": 0 if g["greedy"] else g["temperature"], "top_k": g["top_k"], "top_p": g["top_p"],
             "repeat_penalty": g["repetition_penalty"], "num_predict": g["max_new_tokens"]}
    return " ".join(f"--parameter {k}={v}" for k, v in pairs.items() if v is not None)


def quantize_source(wildcards):
    """The F16 GGUF a model's 4-6 bit exports are quantized from: the kept F16 export, or (keep_f16:
    false, and gguf-f16 not an export) a temporary one under exports/{model}/.f16/."""
    m = model_cfg(wildcards.model)
    if m["keep_f16"] or "gguf-f16" in m["exports"]:
        return f"exports/{wildcards.model}/{wildcards.model}-f16.gguf"
    return f"exports/{wildcards.model}/.f16/{wildcards.model}-f16.gguf"


# ---- importance matrix (rules/imatrix.smk) ------------------------------------------------------


def has_imatrix(name):
    """True when the model configures an importance matrix (models.NAME.imatrix)."""
    return bool(model_cfg(name).get("imatrix"))


def imatrix_file(name):
    """exports/{model}/{model}.imatrix.gguf (its record .json beside it)."""
    return f"exports/{name}/{name}.imatrix.gguf"


def imatrix_text(wildcards):
    """The model's calibration text: imatrix.text, or the bundled mixed Chinese/English one."""
    return eval_path(model_cfg(wildcards.model)["imatrix"].get("text"), "calibration_text.txt")


def imatrix_chunks_flag(wildcards):
    """`--chunks N` of imatrix.py when the model sets imatrix.chunks, else nothing (the whole text)."""
    chunks = model_cfg(wildcards.model)["imatrix"].get("chunks")
    return f"--chunks {chunks}" if chunks else ""


def quantize_imatrix(wildcards):
    """The importance matrix a model's quantized exports are made with ([] when none is configured)."""
    return [imatrix_file(wildcards.model)] if has_imatrix(wildcards.model) else []


def quantize_imatrix_flag(wildcards, input):
    """`--imatrix FILE` of export_gguf.py when the model has one."""
    return f"--imatrix {shell_quote(input.imatrix[0])}" if input.imatrix else ""


def plain_exports(name):
    """The plain counterparts (no importance matrix) the quality table sets beside a model's imatrix
    exports: eval/{model}/plain/{model}-{qtype}.gguf, for each quantized type llama.cpp makes without one."""
    if not has_imatrix(name):
        return []
    return [f"eval/{name}/plain/{name}-{e[5:]}.gguf" for e in model_cfg(name)["exports"]
            if e.startswith("gguf-") and e[5:] in LLAMA_CPP_TYPES and e[5:] not in NEEDS_IMATRIX]


def gguf_quality_refs(wildcards):
    """The F16 (KL from it over the text) and the importance matrix (the text must not be its
    calibration text) of an imatrix model's quality table; nothing for the others."""
    if not has_imatrix(wildcards.model):
        return {}
    return {"f16": quantize_source(wildcards), "imatrix": imatrix_file(wildcards.model)}


def gguf_quality_flags(wildcards, input):
    """--f16 and --imatrix of evaluate.py gguf-quality for an imatrix model."""
    return " ".join(f"--{k} {shell_quote(input[k])}" for k in ("f16", "imatrix") if k in input.keys())


def imatrix_needs():
    """(config key, what) of exports that llama.cpp makes only with an importance matrix, in a model
    without one configured."""
    return [(f"models.{name}.exports", e) for name, m in config["models"].items() if not m.get("imatrix")
            for e in m["exports"] if e.startswith("gguf-") and e[5:] in NEEDS_IMATRIX]


def check_imatrix_config():
    """Stop while the workflow is parsed: a type that needs an importance matrix without one, or an
    importance matrix whose tools (not built yet) cannot be built here (no CMake or compiler)."""
    need = imatrix_needs()
    if need:
        key, e = need[0]
        sys.exit(f"llamaforge: error: config.yaml: {key}: llama.cpp makes {e} only with an importance matrix. "
                 f"Fix: configure one (imatrix: {{text: PATH}} under {key.rsplit('.', 1)[0]}), or choose another type")
    if any(has_imatrix(n) for n in config["models"]) and llama_cpp_importable() and not llama_tools.built():
        lacking = llama_tools.missing_build_tools()
        if lacking:
            sys.exit(f"llamaforge: error: config.yaml: models.*.imatrix needs llama.cpp's tools, and building them "
                     f"needs {' and '.join(lacking)}. Fix: install them (apt-get install cmake build-essential), or "
                     "remove the imatrix settings")


def export_targets():
    """The default target's exports: every model's."""
    return [f for name in config["models"] for f in export_files(name) + modelfile_files(name)]


def export_mem_mb(wildcards, input):
    """Memory of an export: the interpreter and torch (~0.6 GB), two buffers of the largest tensor
    (read ahead, being written) and its blocks. The merged folder's largest tensor is known once the
    merge wrote it (Snakemake evaluates resources again when the job is scheduled); 4 GB before."""
    largest = largest_tensor_bytes([f for d in input.model for f in Path(d).glob("*.safetensors")])
    return int(768 + 3 * largest // 2**20) if largest else 4096


def export_runtime(wildcards, input):
    """Minutes of a streaming export or import: 2 per GiB of input, plus 10."""
    return int(10 + input_mb(input) / 1024 * 2)


def import_tokenizer(wildcards):
    """tokenizer.model of a Meta base, found as scripts/import_pth.py finds it (in the folder or one level up)."""
    return str(find_tokenizer(Path(model_cfg(wildcards.model)["base"])))


def verify_target(name, path):
    """The target that produces a file listed under sha256: (a file inside a built folder is built by it)."""
    return next(
        (d for d in (f"exports/{name}/pth", f"merged/{name}", f"imported/{name}") if path.startswith(f"{d}/")), path
    )


def verify_sums(name):
    """The checksum files written by the model's exports (pth: SHA256SUMS, GGUF: FILE.sha256)."""
    return [
        str(Path(f) / "SHA256SUMS") if Path(f).name == "pth" else f"{f}.sha256"
        for f in export_files(name)
        if f.startswith("exports")
    ]


def pth_shards_flag(wildcards):
    """`--num-shards N` of export_pth.py when the model sets pth_shards, else nothing."""
    shards = model_cfg(wildcards.model)["pth_shards"]
    return f"--num-shards {shards}" if shards else ""


def verify_inputs(wildcards):
    """What verify checks: the targets of the files under sha256: and the model's exports."""
    m = model_cfg(wildcards.model)
    return sorted({verify_target(wildcards.model, p) for p in m["sha256"]} | set(export_files(wildcards.model)))


def verify_expect_flags(wildcards):
    """`--expect PATH=SHA256` for each entry under the model's sha256:."""
    return " ".join(f"--expect {shell_quote(f'{p}={h}')}" for p, h in sorted(model_cfg(wildcards.model)["sha256"].items()))


def verify_sums_flags(wildcards):
    """`--sums FILE` for each checksum file the model's exports write."""
    return " ".join(f"--sums {shell_quote(s)}" for s in verify_sums(wildcards.model))


def verify_runtime(wildcards, input):
    """Minutes of a verification: 1 per GiB hashed, plus 10."""
    return int(10 + input_mb(input) / 1024)


# ---- evaluation ---------------------------------------------------------------------------------

EVAL_DATA = "src/llamaforge/data"
EVAL_FILES = ["predictions.json", "perplexity.json", "equivalence.json", "tokenizer_stats.json", "summary.json"]
EVAL_PLOTS = ["eval/plots/tokens_per_char.png", "eval/plots/perplexity.png", "eval/plots/equivalence.png"]
GGUF_PLOT = "eval/plots/gguf_quality.png"


def eval_models():
    """Models with `evaluate: true`."""
    return [name for name, m in config["models"].items() if m["evaluate"]]


def gguf_exports(name):
    """The GGUF files among a model's exports."""
    return [f for f in export_files(name) if f.endswith(".gguf")]


def llama_cpp_importable():
    """True when llama-cpp-python (the gguf extra) can be imported, not merely found."""
    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def llama_cpp_needs():
    """(config key, what) of everything config.yaml asks for that llama.cpp makes: a 4-6 bit GGUF
    export (its quantizer), then an evaluated model's GGUF quality table (its inference)."""
    needs = [(f"models.{name}.exports", e) for name, m in config["models"].items()
             for e in m["exports"] if e.startswith("gguf-") and e[5:] in LLAMA_CPP_TYPES]
    needs += [(f"models.{name}.evaluate", f"the GGUF quality table eval/{name}/gguf.json")
              for name in eval_models() if gguf_exports(name)]
    return needs


def check_llama_cpp():
    """Stop, while the workflow is parsed, when config.yaml asks for something llama.cpp makes and
    llama-cpp-python cannot be imported: which targets exist depends on the config only, never on
    what is installed, so this is one line at the start rather than a job failing hours in."""
    needs = llama_cpp_needs()
    if not needs or llama_cpp_importable():
        return
    key, what = needs[0]
    undo = "remove the export" if key.endswith(".exports") else "set evaluate: false, or remove its GGUF exports"
    sys.exit(f"llamaforge: error: config.yaml: {key}: {what} needs llama-cpp-python. "
             f"Fix: pip install 'llamaforge[gguf]' (or {undo})")


def eval_files(name):
    """One model's evaluation outputs; no equivalence check without adapters (nothing was merged);
    the GGUF quality table when the model has GGUF exports."""
    files = [f"eval/{name}/{f}" for f in EVAL_FILES if f != "equivalence.json" or model_cfg(name)["loras"]]
    return files + ([f"eval/{name}/gguf.json"] if gguf_exports(name) else [])


def gguf_quality_models():
    """Evaluated models with GGUF exports (the GGUF quality plot's points)."""
    return [name for name in eval_models() if gguf_exports(name)]


check_llama_cpp()
check_imatrix_config()


def eval_targets():
    """The default target's evaluation outputs: every evaluated model's files, then the plots."""
    plots = (EVAL_PLOTS if eval_models() else []) + ([GGUF_PLOT] if gguf_quality_models() else [])
    plots += [MC_PLOT] if mc_models() else []  # rules/multiple_choice.smk
    return [f for name in eval_models() for f in eval_files(name) + mc_files(name)] + plots


def eval_path(value, bundled):
    """A file from config.yaml, or the bundled one under src/llamaforge/data/ when it is null."""
    return value or f"{EVAL_DATA}/{bundled}"


def eval_device(wildcards):
    """cuda for a model with `gpu: 1` or more, else cpu."""
    return "cuda" if model_cfg(wildcards.model)["gpu"] else "cpu"


def eval_gpu(wildcards):
    """GPUs an evaluation job asks for (config `gpu:`)."""
    return model_cfg(wildcards.model)["gpu"]


def eval_mem_mb(wildcards, input):
    """Memory: a float16 model on disk is 2x in float32, plus activations, logits and the Python stack."""
    return int(2000 + 3 * input_mb(input.model))


def eval_runtime(per_gb):
    """Runtime in minutes of an evaluation job, `per_gb` minutes per GB of weights on a CPU (a GPU is
    taken as ten times faster, so a 65B job on a GPU partition fits its MaxTime). Returns the
    resource function."""

    def runtime(wildcards, input):
        return int(10 + per_gb * input_mb(input.model) / 1024 / (10 if eval_gpu(wildcards) else 1))

    return runtime


def eval_summary_inputs(wildcards):
    """The inputs of a model's summary: the script, its modules, and its other evaluation outputs."""
    files = {Path(f).stem: f for f in eval_files(wildcards.model) if Path(f).name not in ("summary.json", "gguf.json")}
    return {**script_inputs("scripts/evaluate.py"), **files, "multiple_choice": mc_files(wildcards.model)}


def eval_summary_flags(wildcards, input):
    """summary's `--predictions FILE ...` options: one per evaluation output the model has."""
    return " ".join(
        f"--{key.replace('_', '-')} {shell_quote(input[key])}"
        for key in ("predictions", "perplexity", "equivalence", "tokenizer_stats")
        if key in input.keys()
    ) + "".join(f" --multiple-choice {shell_quote(f)}" for f in input.multiple_choice)


def eval_summaries(wildcards):
    """The summary of every evaluated model (the plots' inputs)."""
    return [f"eval/{name}/summary.json" for name in eval_models()]


def model_gguf_exports(wildcards):
    """The model's GGUF exports (the GGUF quality table's inputs), and the plain counterparts of its
    imatrix exports."""
    return gguf_exports(wildcards.model) + plain_exports(wildcards.model)


def gguf_qualities(wildcards):
    """The GGUF quality table of every evaluated model with GGUF exports (the GGUF plot's inputs)."""
    return [f"eval/{name}/gguf.json" for name in gguf_quality_models()]


# ---- multiple-choice evaluation (rules/multiple_choice.smk) ----------------------------------

MC_SETS = config["eval"]["multiple_choice"]
MC_PLOT = "eval/plots/multiple_choice.png"


def check_mc_sets():
    """Stop, while the workflow is parsed, on a set with shots but no dev file to take them from."""
    for name, s in MC_SETS.items():
        if s["shots"] and not s.get("dev"):
            sys.exit(f"llamaforge: error: config.yaml: eval.multiple_choice.{name}: shots is {s['shots']} but there is "
                     "no dev file. Fix: add dev: FILE (the rows the shots come from), or set shots: 0")


check_mc_sets()


def mc_flags(wildcards):
    """--shots/--dev/--template options of a set (every value from config.yaml, so a change reruns it)."""
    s = MC_SETS[wildcards.mcset]
    flags = [f"--shots {s['shots']}", f"--template {s['template']}"]
    if s["shots"]:
        flags.append(f"--dev {shell_quote(s['dev'])}")
    return " ".join(flags)


def mc_inputs(wildcards):
    """The set's data file, and its dev file when it has shots."""
    s = MC_SETS[wildcards.mcset]
    return {"data": s["data"], **({"dev": s["dev"]} if s["shots"] else {})}


def mc_files(name):
    """A model's multiple-choice summaries: one per set for the merged model and per GGUF export."""
    gtypes = [Path(f).name[len(name) + 1 : -len(".gguf")] for f in gguf_exports(name)]
    return [f"eval/{name}/mc/{s}.json" for s in MC_SETS] + [f"eval/{name}/mc/{s}.{g}.json" for s in MC_SETS for g in gtypes]


def mc_gguf(wildcards):
    """The GGUF export eval/{model}/mc/{mcset}.{gtype}.json scores."""
    return f"exports/{wildcards.model}/{wildcards.model}-{wildcards.gtype}.gguf"


def mc_models():
    """Evaluated models that have multiple-choice results (the plot's lines)."""
    return eval_models() if MC_SETS else []


def mc_summaries(wildcards):
    """The summaries the multiple-choice plot reads."""
    return [f"eval/{name}/summary.json" for name in mc_models()]



# ---- targets ------------------------------------------------------------------------------------


def all_targets():
    """The default target: every tokenizer, merge, export and evaluation output in config.yaml."""
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
    """`text` quoted for the shell (for values joined into one params string)."""
    import shlex

    return shlex.quote(str(text))


def merge_mem_mb(wildcards, input):
    """Memory of a merge: bounded by the largest tensor, not the model (the tensor being merged, the
    one read ahead, the one being written and its float32 row blocks), plus the interpreter and
    torch (~0.5 GB)."""
    largest = largest_tensor_bytes(list(input.base) + list(input.loras))
    return 768 + 5 * largest // 2**20
