# The embedded demo: tiny LLaMA base, SentencePiece models and PEFT LoRAs, generated from a seed.


rule make_demo:
    input:
        script="scripts/make_demo.py",
        lib=script_lib("scripts/make_demo.py"),
        english="src/llamaforge/data/english.txt",
        chinese="src/llamaforge/data/chinese.txt",
    output:
        DEMO_OUTPUTS,
    params:
        outdir=demo_outdir,
        seed=config["demo"]["seed"],
    log:
        "logs/demo/make_demo.log",
    benchmark:
        "logs/benchmarks/demo/make_demo.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/demo.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --output {params.outdir:q} --seed {params.seed} > {log:q} 2>&1"
