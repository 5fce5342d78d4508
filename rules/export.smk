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
        weights=configured_base_files,
        tokenizer=import_tokenizer,
    output:
        directory("imported/{model}"),
    params:
        base=configured_base,
        max_shard_size=model_setting("max_shard_size"),
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
        model=merged_model_files,
    output:
        directory("exports/{model}/pth"),
    params:
        model="merged/{model}",
        shards=pth_shards_flag,
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
        model=merged_model_files,
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
        model=merged_model_files,
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


# 2-6 bit GGUF by llama.cpp's own quantizer (llama-cpp-python, the gguf extra), from the F16 export; with
# the model's importance matrix (imatrix: in config.yaml) by llama.cpp's llama-quantize --imatrix
rule quantize_gguf:
    input:
        script="scripts/export_gguf.py",
        lib=script_lib("scripts/export_gguf.py"),
        model=merged_model_files,
        f16=quantize_source,
        imatrix=quantize_imatrix,
    output:
        gguf="exports/{model}/{model}-{qtype}.gguf",
        sha256="exports/{model}/{model}-{qtype}.gguf.sha256",
    wildcard_constraints:
        qtype="|".join(LLAMA_CPP_TYPES),
    params:
        model="merged/{model}",
        imatrix=quantize_imatrix_flag,
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
        "--output {output.gguf:q} --outtype {wildcards.qtype} --threads {threads} --no-modelfile {params.imatrix} "
        "> {log:q} 2>&1"


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
    # no benchmark: it only reads the GGUF's header and writes a small text file
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
        files=verify_inputs,
    output:
        "verify/{model}",
    params:
        expect=verify_expect_flags,
        sums=verify_sums_flags,
    log:
        "logs/verify/{model}.log",
    benchmark:
        "logs/benchmarks/verify/{model}.tsv"
    threads: 1
    resources:
        mem_mb=1024,
        runtime=verify_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "python {input.script:q} {params.expect} {params.sums} --output {output:q} > {log:q} 2>&1"
