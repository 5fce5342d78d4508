# Exports of each merged model (Meta consolidated.NN.pth, GGUF), the import of a Meta base, and
# sha256 verification. Uses model_cfg, folder_files, input_mb and shell_quote from rules/common.smk.
#
#   exports/{model}/pth/                      consolidated.NN.pth, params.json, tokenizer.model, SHA256SUMS
#   exports/{model}/{model}-{outtype}.gguf    + {model}-{outtype}.gguf.sha256   (outtype f16, bf16, q8_0)
#   imported/{model}/                         a Meta base as a Hugging Face folder (common.smk's model_base_dir)
#   verify/{model}                            report of the sha256 check; fails on any mismatch
#
# The helpers are lambdas: `snakemake --lint` wants no `def` beside rules.

from llamaforge.formats import largest_tensor_bytes  # noqa: E402
from llamaforge.meta import find_tokenizer  # noqa: E402

# Every llamaforge module each rule's script imports (the package, its errors, the CLI helpers and
# the modules they pull in): a change to any of them reruns the rule. The GGUF export alone reads
# tokenizer.model (tokenizer.py); verify runs export.py's verify_sha256.
_LIB = ["src/llamaforge/__init__.py", "src/llamaforge/errors.py", "src/llamaforge/cli.py"]
EXPORT_LIB = _LIB + ["src/llamaforge/export.py", "src/llamaforge/formats.py", "src/llamaforge/fsutil.py",
                     "src/llamaforge/names.py"]
GGUF_LIB = EXPORT_LIB + ["src/llamaforge/tokenizer.py"]
IMPORT_LIB = _LIB + ["src/llamaforge/meta.py", "src/llamaforge/formats.py", "src/llamaforge/fsutil.py",
                     "src/llamaforge/names.py", "src/llamaforge/tokenizer.py"]


# The export files of one model, per its `exports:` list (hf = merged/{model} itself).
export_files = lambda name: [
    {"hf": f"merged/{name}", "pth": f"exports/{name}/pth"}.get(e, f"exports/{name}/{name}-{e[5:]}.gguf")
    for e in model_cfg(name)["exports"]
]
# The default target's exports: every model's (the lead adds export_targets() to `rule all`).
export_targets = lambda: [f for name in config["models"] for f in export_files(name)]
# Memory, like common.smk's merge_mem_mb: the interpreter and torch (~0.6 GB), two buffers of the
# largest tensor (read ahead, being written) and its blocks. The merged folder's largest tensor is
# known once the merge wrote it (Snakemake evaluates resources again when the job is scheduled);
# 4 GB before.
export_mem_mb = lambda wc, input: (lambda largest: int(768 + 3 * largest // 2**20) if largest else 4096)(
    largest_tensor_bytes([f for d in input.model for f in Path(d).glob("*.safetensors")])
)
# Runtime (minutes) of a streaming export or import: 2 per GiB of input, plus 10.
export_runtime = lambda wc, input: int(10 + input_mb(input) / 1024 * 2)
# tokenizer.model of a Meta base, found as scripts/import_pth.py finds it (in the folder or one level up).
import_tokenizer = lambda wc: str(find_tokenizer(Path(model_cfg(wc.model)["base"])))
# The target that produces a file listed under sha256: (a file inside a built folder is built by it).
verify_target = lambda name, path: next(
    (d for d in (f"exports/{name}/pth", f"merged/{name}", f"imported/{name}") if path.startswith(f"{d}/")), path
)
# The checksum files written by the model's exports (pth: SHA256SUMS, GGUF: FILE.sha256).
verify_sums = lambda name: [
    str(Path(f) / "SHA256SUMS") if Path(f).name == "pth" else f"{f}.sha256"
    for f in export_files(name)
    if f.startswith("exports")
]


rule import_pth:
    input:
        script="scripts/import_pth.py",
        lib=IMPORT_LIB,
        weights=lambda wc: folder_files(model_cfg(wc.model)["base"]),
        tokenizer=import_tokenizer,
    output:
        directory("imported/{model}"),
    params:
        base=lambda wc: model_cfg(wc.model)["base"],
        max_shard_size=lambda wc: model_cfg(wc.model)["max_shard_size"],
    log:
        "logs/import/{model}.log",
    benchmark:
        "logs/benchmarks/import/{model}.tsv"
    threads: 1
    resources:
        # blocks of 16 MB per shard, never a tensor: the interpreter and torch dominate
        mem_mb=1536,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --input {params.base:q} --tokenizer {input.tokenizer:q} --output {output:q} "
        "--max-shard-size '{params.max_shard_size}' > {log:q} 2>&1"


rule export_pth:
    input:
        script="scripts/export_pth.py",
        lib=EXPORT_LIB,
        model=lambda wc: folder_files(f"merged/{wc.model}"),
    output:
        directory("exports/{model}/pth"),
    params:
        model="merged/{model}",
        shards=lambda wc: (
            f"--num-shards {model_cfg(wc.model)['pth_shards']}" if model_cfg(wc.model)["pth_shards"] else ""
        ),
    log:
        "logs/export/{model}/pth.log",
    benchmark:
        "logs/benchmarks/export/{model}/pth.tsv"
    threads: 2
    resources:
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --output {output:q} "
        "{params.shards} > {log:q} 2>&1"


rule export_gguf:
    input:
        script="scripts/export_gguf.py",
        lib=GGUF_LIB,
        model=lambda wc: folder_files(f"merged/{wc.model}"),
    output:
        gguf="exports/{model}/{model}-{outtype}.gguf",
        sha256="exports/{model}/{model}-{outtype}.gguf.sha256",
    wildcard_constraints:
        outtype="f16|bf16|q8_0",
    params:
        model="merged/{model}",
    log:
        "logs/export/{model}/gguf-{outtype}.log",
    benchmark:
        "logs/benchmarks/export/{model}/gguf-{outtype}.tsv"
    threads: 2
    resources:
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --output {output.gguf:q} "
        "--outtype {wildcards.outtype} --name {wildcards.model:q} > {log:q} 2>&1"


rule verify:
    input:
        script="scripts/verify_sha256.py",
        lib=EXPORT_LIB,
        files=lambda wc: sorted(
            {verify_target(wc.model, p) for p in model_cfg(wc.model)["sha256"]} | set(export_files(wc.model))
        ),
    output:
        "verify/{model}",
    params:
        expect=lambda wc: " ".join(
            f"--expect {shell_quote(f'{p}={h}')}" for p, h in sorted(model_cfg(wc.model)["sha256"].items())
        ),
        sums=lambda wc: " ".join(f"--sums {shell_quote(s)}" for s in verify_sums(wc.model)),
    log:
        "logs/verify/{model}.log",
    threads: 1
    resources:
        mem_mb=1024,
        runtime=lambda wc, input: int(10 + input_mb(input) / 1024),
    conda:
        "../envs/export.yaml"
    shell:
        "python {input.script:q} {params.expect} {params.sums} --output {output:q} > {log:q} 2>&1"
