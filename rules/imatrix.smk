# Importance-matrix quantization (a model's `imatrix: {text, chunks}` in config.yaml): llama.cpp's own
# llama-imatrix and llama-quantize, built once per llama-cpp-python version into the cache.
#
#   ~/.cache/llamaforge/llama.cpp-tools/{version}/BUILD.json   the tools ($LLAMAFORGE_TOOLS_DIR overrides)
#   exports/{model}/{model}.imatrix.gguf (+ .json)              the matrix and its record (text sha256)
#   eval/{model}/plain/{model}-{qtype}.gguf                     the plain counterparts the quality
#                                                               table sets beside the imatrix exports
#
# Helpers (imatrix_text, quantize_imatrix, plain_exports, ...) are documented defs in common.smk.

# BUILD.json of the installed llama-cpp-python's tools; the build is the cache's, as pip's wheel is:
# no input (an edit of the builder never rebuilds it; a new version is a new folder), and its users
# take it as ancient(), so its time never reruns them
# (llama-cpp-python's version from its metadata: nothing is imported; not installed: a placeholder no
# configured target reaches, since check_llama_cpp stops first)
TOOLS_STAMP = str(llama_tools.stamp_path()) if llama_tools.installed_version() else "llama.cpp-tools/BUILD.json"


rule build_tools:
    output:
        TOOLS_STAMP,
    log:
        "logs/tools/build.log",
    benchmark:
        "logs/benchmarks/tools/build.tsv"
    threads: 2
    resources:
        mem_mb=2048,
        runtime=60,
    conda:
        "../envs/export.yaml"
    shell:
        "python scripts/build_tools.py --jobs {threads} > {log:q} 2>&1"


rule imatrix:
    input:
        script="scripts/imatrix.py",
        lib=script_lib("scripts/imatrix.py"),
        model=merged_model_files,
        f16=quantize_source,
        text=imatrix_text,
        tools=ancient(TOOLS_STAMP),
    output:
        imatrix="exports/{model}/{model}.imatrix.gguf",
        record="exports/{model}/{model}.imatrix.gguf.json",
    params:
        model="merged/{model}",
        chunks=imatrix_chunks_flag,
    log:
        "logs/export/{model}/imatrix.log",
    benchmark:
        "logs/benchmarks/export/{model}/imatrix.tsv"
    threads: 2
    resources:
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "python {input.script:q} --model {params.model:q} --from-f16 {input.f16:q} --text {input.text:q} "
        "--output {output.imatrix:q} {params.chunks} --threads {threads} > {log:q} 2>&1"


# The same types without the importance matrix, for the quality table's side-by-side columns
rule quantize_plain:
    input:
        script="scripts/export_gguf.py",
        lib=script_lib("scripts/export_gguf.py"),
        model=merged_model_files,
        f16=quantize_source,
    output:
        gguf=temp("eval/{model}/plain/{model}-{qtype}.gguf"),
        sha256=temp("eval/{model}/plain/{model}-{qtype}.gguf.sha256"),
    wildcard_constraints:
        qtype="|".join(LLAMA_CPP_TYPES),
    params:
        model="merged/{model}",
    log:
        "logs/eval/{model}/plain-{qtype}.log",
    benchmark:
        "logs/benchmarks/eval/{model}/plain-{qtype}.tsv"
    threads: 2
    resources:
        mem_mb=export_mem_mb,
        runtime=export_runtime,
    conda:
        "../envs/export.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --from-f16 {input.f16:q} "
        "--output {output.gguf:q} --outtype {wildcards.qtype} --threads {threads} --no-modelfile > {log:q} 2>&1"
