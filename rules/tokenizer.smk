# Tokenizer merge (Chinese-LLaMA recipe): base SentencePiece + extra pieces (+ [PAD]).


rule merge_tokenizers:
    input:
        script="scripts/merge_tokenizers.py",
        lib=script_lib("scripts/merge_tokenizers.py"),
        base=lambda wc: folder_files(tokenizer_cfg(wc.name)["base"]),
        extra=lambda wc: tokenizer_cfg(wc.name)["extra"] or [],
    output:
        directory("tokenizers/{name}"),
    params:
        base=lambda wc: tokenizer_cfg(wc.name)["base"],
        extra=lambda wc: f"--extra {shell_quote(tokenizer_cfg(wc.name)['extra'])}" if tokenizer_cfg(wc.name)["extra"] else "",
        add_tokens=lambda wc: " ".join(
            f"--add-token {shell_quote(t)}" for t in tokenizer_cfg(wc.name)["add_tokens"]
        ),
    log:
        "logs/tokenizers/{name}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tokenizer.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --base {params.base:q} {params.extra} "
        "{params.add_tokens} --output {output:q} > {log:q} 2>&1"
