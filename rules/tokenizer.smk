# Tokenizer merge (Chinese-LLaMA recipe): base SentencePiece + extra pieces (+ [PAD]).


rule merge_tokenizers:
    input:
        script="scripts/merge_tokenizers.py",
        lib=script_lib("scripts/merge_tokenizers.py"),
        base=tokenizer_base_files,
        extra=tokenizer_extra_file,
    output:
        directory("tokenizers/{name}"),
    params:
        base=tokenizer_base,
        extra=tokenizer_extra_flag,
        add_tokens=tokenizer_add_token_flags,
    log:
        "logs/tokenizers/{name}.log",
    benchmark:
        "logs/benchmarks/tokenizers/{name}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tokenizer.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --base {params.base:q} {params.extra} "
        "{params.add_tokens} --output {output:q} > {log:q} 2>&1"
