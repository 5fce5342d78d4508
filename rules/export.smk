# Exports of each merged model (Meta consolidated.NN.pth, GGUF), the import of a Meta base, and
# sha256 verification.
#
#   exports/{model}/pth/                      consolidated.NN.pth, params.json, tokenizer.model, SHA256SUMS
#   exports/{model}/{model}-{outtype}.gguf    + .gguf.sha256 + .Modelfile (f16, bf16, q8_0: llamaforge;
#                                             q4_0 ... q6_k: llama.cpp's quantizer, from the f16)
#   imported/{model}/                         a Meta base as a Hugging Face folder (common.smk's model_base_dir)
#   verify/{model}                            report of the sha256 check; fails on any mismatch
#
# Every helper (export_files, export_mem_mb, verify_target, ...) is a documented def in common.smk.


rule import_pth:
    input:
        script="scripts/import_pth.py",
        lib=script_lib("scripts/import_pth.py"),
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
        # blocks of rows (llamaforge.stream), never a tensor: the interpreter and torch dominate
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
        lib=script_lib("scripts/export_pth.py"),
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
        lib=script_lib("scripts/export_gguf.py"),
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
        "--outtype {wildcards.outtype} --name {wildcards.model:q} --no-modelfile > {log:q} 2>&1"


# The F16 GGUF a model's quantized exports are made from when keep_f16 is false: deleted once used
rule export_gguf_scratch:
    input:
        script="scripts/export_gguf.py",
        lib=script_lib("scripts/export_gguf.py"),
        model=lambda wc: folder_files(f"merged/{wc.model}"),
    output:
        gguf=temp("exports/{model}/.f16/{model}-f16.gguf"),
        sha256=temp("exports/{model}/.f16/{model}-f16.gguf.sha256"),
    params:
        model="merged/{model}",
    log:
        "logs/export/{model}/gguf-f16-scratch.log",
    benchmark:
        "logs/benchmarks/export/{model}/gguf-f16-scratch.tsv"
    threads: 2
    resources:
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --output {output.gguf:q} "
        "--outtype f16 --name {wildcards.model:q} --no-modelfile > {log:q} 2>&1"


# 4-6 bit GGUF by llama.cpp's own quantizer (llama-cpp-python, the gguf extra), from the F16 export
rule quantize_gguf:
    input:
        script="scripts/export_gguf.py",
        lib=script_lib("scripts/export_gguf.py"),
        model=lambda wc: folder_files(f"merged/{wc.model}"),
        f16=quantize_source,
    output:
        gguf="exports/{model}/{model}-{qtype}.gguf",
        sha256="exports/{model}/{model}-{qtype}.gguf.sha256",
    wildcard_constraints:
        qtype="|".join(LLAMA_CPP_TYPES),
    params:
        model="merged/{model}",
    log:
        "logs/export/{model}/gguf-{qtype}.log",
    benchmark:
        "logs/benchmarks/export/{model}/gguf-{qtype}.tsv"
    threads: 2
    resources:
        # llama.cpp quantizes tensor by tensor: the largest tensor in F16 and F32, and its output
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --from-f16 {input.f16:q} "
        "--output {output.gguf:q} --outtype {wildcards.qtype} --threads {threads} --no-modelfile > {log:q} 2>&1"


# The Ollama Modelfile beside each GGUF export: cheap, so the generation settings it carries rewrite it
# alone, never the GGUF
rule gguf_modelfile:
    input:
        script="scripts/modelfile.py",
        lib=script_lib("scripts/modelfile.py"),
        gguf="exports/{model}/{model}-{gtype}.gguf",
    output:
        "exports/{model}/{model}-{gtype}.Modelfile",
    wildcard_constraints:
        gtype="|".join(("f16", "bf16", "q8_0") + LLAMA_CPP_TYPES),
    params:
        parameters=modelfile_parameters,
    log:
        "logs/export/{model}/modelfile-{gtype}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/export.yaml"
    shell:
        "python {input.script:q} --gguf {input.gguf:q} --output {output:q} {params.parameters} > {log:q} 2>&1"


rule verify:
    input:
        script="scripts/verify_sha256.py",
        lib=script_lib("scripts/verify_sha256.py"),
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
