# Multiple-choice accuracy (C-Eval, CMMLU, MMLU-like JSONL) of each evaluated model and of each of
# its GGUF exports: eval/{model}/mc/{mcset}.json (+ .jsonl, one line per question) for the merged
# model, eval/{model}/mc/{mcset}.{gtype}.json (+ .jsonl) for exports/{model}/{model}-{gtype}.gguf.
# Sets: config `eval.multiple_choice` (README, "Multiple-choice evaluation"). The model's
# summary.json gathers them into one table; eval/plots/multiple_choice.png plots accuracy against
# bits per weight.

wildcard_constraints:
    mcset="|".join(re.escape(s) for s in MC_SETS) or "(?!)",


rule eval_mc:
    input:
        unpack(mc_inputs),
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        model=merged_model_files,
    output:
        summary=report(
            "eval/{model}/mc/{mcset}.json",
            caption="../report/multiple_choice.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "multiple choice {mcset}"},
        ),
        jsonl="eval/{model}/mc/{mcset}.jsonl",
    params:
        model="merged/{model}",
        flags=mc_flags,
    log:
        "logs/eval/{model}/mc/{mcset}.log",
    benchmark:
        "logs/benchmarks/eval/{model}/mc/{mcset}.tsv"
    threads: 2
    resources:
        mem_mb=eval_mem_mb,
        runtime=eval_runtime(60),
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} multiple-choice --model {params.model:q} "
        "--data {input.data:q} {params.flags} --output {output.summary:q} --items {output.jsonl:q} > {log:q} 2>&1"


rule eval_mc_gguf:
    input:
        unpack(mc_inputs),
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        gguf=mc_gguf,
    output:
        summary=report(
            "eval/{model}/mc/{mcset}.{gtype}.json",
            caption="../report/multiple_choice.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "multiple choice {mcset} ({gtype})"},
        ),
        jsonl="eval/{model}/mc/{mcset}.{gtype}.jsonl",
    wildcard_constraints:
        gtype="|".join(("f16", "bf16", "q8_0") + LLAMA_CPP_TYPES),
    params:
        flags=mc_flags,
    log:
        "logs/eval/{model}/mc/{mcset}.{gtype}.log",
    benchmark:
        "logs/benchmarks/eval/{model}/mc/{mcset}.{gtype}.tsv"
    threads: 2
    resources:
        mem_mb=lambda wildcards, input: int(1500 + 2 * input_mb([input.gguf])),
        runtime=lambda wildcards, input: int(10 + 30 * input_mb([input.gguf]) / 1024),
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} multiple-choice --gguf {input.gguf:q} "
        "--data {input.data:q} {params.flags} --output {output.summary:q} --items {output.jsonl:q} > {log:q} 2>&1"


rule eval_mc_plot:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        summaries=mc_summaries,
    output:
        report(
            MC_PLOT,
            caption="../report/plot_multiple_choice.rst",
            category="Evaluation",
            subcategory="All models",
            labels={"plot": "multiple choice"},
        ),
    params:
        summaries=repeated_option("summary", "summaries"),
    log:
        "logs/eval/mc_plot.log",
    benchmark:
        "logs/benchmarks/eval/mc_plot.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python {input.script:q} mc-plot {params.summaries} --output {output:q} > {log:q} 2>&1"
