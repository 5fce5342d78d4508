# Evaluation of each merged model: predictions, perplexity, merge equivalence, tokenizer statistics,
# a per-model summary and plots over all models, all marked for `snakemake --report report.html`.
#
# Settings: the `eval:` section of config.yaml (defaults in schemas/config.schema.yaml). A model is
# evaluated when `evaluate: true` (the default). Every helper (eval_files, eval_mem_mb, ...) is a
# documented def in rules/common.smk.

EVAL_GEN = config["eval"]["generation"]
# inference.py options of the predictions (every value from config.yaml, so a change reruns them)
EVAL_GEN_FLAGS = " ".join(
    [
        f"--template {EVAL_GEN['template']}",
        "--with-prompt" if EVAL_GEN["with_prompt"] else "--no-prompt",
        f"--batch-size {EVAL_GEN['batch_size']}",
        f"--max-new-tokens {EVAL_GEN['max_new_tokens']}",
        f"--temperature {EVAL_GEN['temperature']}",
        f"--top-p {EVAL_GEN['top_p']}",
        f"--top-k {EVAL_GEN['top_k']}",
        f"--repetition-penalty {EVAL_GEN['repetition_penalty']}",
        f"--dtype {config['eval']['dtype']}",
    ]
    + (["--greedy"] if EVAL_GEN["greedy"] else [])
    + ([f"--seed {EVAL_GEN['seed']}"] if EVAL_GEN["seed"] is not None else [])
)


rule eval_predictions:
    input:
        script="scripts/inference.py",
        lib=script_lib("scripts/inference.py"),
        model=merged_model_files,
        prompts=eval_path(config["eval"]["prompts"], "eval_prompts.txt"),
    output:
        predictions=report(
            "eval/{model}/predictions.json",
            caption="../report/predictions.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "predictions"},
        ),
        config="eval/{model}/generation_config.json",
    params:
        model="merged/{model}",
        flags=EVAL_GEN_FLAGS,
        device=eval_device,
    log:
        "logs/eval/{model}/predictions.log",
    benchmark:
        "logs/benchmarks/eval/{model}/predictions.tsv"
    threads: 4
    resources:
        mem_mb=eval_mem_mb,
        runtime=eval_runtime(60),
        gpu=eval_gpu,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --model {params.model:q} --data-file {input.prompts:q} "
        "--predictions-file {output.predictions:q} {params.flags} --device {params.device} > {log:q} 2>&1"


rule eval_perplexity:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        model=merged_model_files,
        text=eval_path(config["eval"]["text"], "eval_text.txt"),
    output:
        report(
            "eval/{model}/perplexity.json",
            caption="../report/perplexity.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "perplexity"},
        ),
    params:
        model="merged/{model}",
        max_length=(
            f"--max-length {config['eval']['perplexity']['max_length']}"
            if config["eval"]["perplexity"]["max_length"]
            else ""
        ),
        stride=config["eval"]["perplexity"]["stride"],
        dtype=config["eval"]["dtype"],
        device=eval_device,
    log:
        "logs/eval/{model}/perplexity.log",
    benchmark:
        "logs/benchmarks/eval/{model}/perplexity.tsv"
    threads: 4
    resources:
        mem_mb=eval_mem_mb,
        runtime=eval_runtime(20),
        gpu=eval_gpu,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} perplexity --model {params.model:q} --text {input.text:q} "
        "{params.max_length} --stride {params.stride} --dtype {params.dtype} --device {params.device} "
        "--output {output:q} > {log:q} 2>&1"


rule eval_equivalence:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        model=merged_model_files,
        base=base_dir_files,
        loras=lora_files,
        prompts=eval_path(config["eval"]["equivalence"]["prompts"], "eval_prompts.txt"),
    output:
        report(
            "eval/{model}/equivalence.json",
            caption="../report/equivalence.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "equivalence"},
        ),
    params:
        merged="merged/{model}",
        base=base_dir,
        loras=lora_flags,
        tolerance=config["eval"]["equivalence"]["tolerance"],
        device=eval_device,
    log:
        "logs/eval/{model}/equivalence.log",
    benchmark:
        "logs/benchmarks/eval/{model}/equivalence.tsv"
    threads: 4
    resources:
        # base + adapters in float32, then the merged model in float32, one at a time
        mem_mb=eval_mem_mb,
        runtime=eval_runtime(20),
        gpu=eval_gpu,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} equivalence --merged {params.merged:q} --base {params.base:q} "
        "{params.loras} --prompts {input.prompts:q} --tolerance {params.tolerance} --device {params.device} "
        "--output {output:q} > {log:q} 2>&1"


rule eval_tokenizer_stats:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        # the merged model's tokenizer: exactly the one the merge chose and checked
        tokenizer=merged_model_files,
        base=configured_base_files,
        text=eval_path(config["eval"]["text"], "eval_text.txt"),
    output:
        report(
            "eval/{model}/tokenizer_stats.json",
            caption="../report/tokenizer_stats.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "tokenizer statistics"},
        ),
    params:
        tokenizer="merged/{model}",
        # the base folder as configured: a Meta folder's tokenizer.model is read with SentencePiece
        base=configured_base,
    log:
        "logs/eval/{model}/tokenizer_stats.log",
    benchmark:
        "logs/benchmarks/eval/{model}/tokenizer_stats.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} tokenizer-stats --tokenizer {params.tokenizer:q} --base-tokenizer {params.base:q} "
        "--text {input.text:q} --output {output:q} > {log:q} 2>&1"


rule eval_summary:
    input:
        unpack(eval_summary_inputs),
    output:
        report(
            "eval/{model}/summary.json",
            caption="../report/summary.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "summary"},
        ),
    params:
        flags=eval_summary_flags,
    log:
        "logs/eval/{model}/summary.log",
    # no benchmark: it only gathers the model's small evaluation JSON files into one
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python {input.script:q} summary --model {wildcards.model:q} {params.flags} --output {output:q} > {log:q} 2>&1"


rule eval_plots:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        summaries=eval_summaries,
    output:
        tokens_per_char=report(
            EVAL_PLOTS[0],
            caption="../report/plot_tokens_per_char.rst",
            category="Evaluation",
            subcategory="All models",
            labels={"plot": "tokens per character"},
        ),
        perplexity=report(
            EVAL_PLOTS[1],
            caption="../report/plot_perplexity.rst",
            category="Evaluation",
            subcategory="All models",
            labels={"plot": "perplexity"},
        ),
        equivalence=report(
            EVAL_PLOTS[2],
            caption="../report/plot_equivalence.rst",
            category="Evaluation",
            subcategory="All models",
            labels={"plot": "merge equivalence"},
        ),
    params:
        summaries=repeated_option("summary", "summaries"),
    log:
        "logs/eval/plots.log",
    benchmark:
        "logs/benchmarks/eval/plots.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python {input.script:q} plot {params.summaries} --tokens-per-char {output.tokens_per_char:q} "
        "--perplexity {output.perplexity:q} --equivalence {output.equivalence:q} > {log:q} 2>&1"


# What each GGUF export costs in quality, measured with llama.cpp (the gguf extra)
rule eval_gguf:
    input:
        unpack(gguf_quality_refs),  # an imatrix model's F16 and importance matrix
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        model=merged_model_files,
        ggufs=model_gguf_exports,
        text=eval_path(config["eval"]["text"], "eval_text.txt"),
        prompts=eval_path(config["eval"]["equivalence"]["prompts"], "eval_prompts.txt"),
    output:
        report(
            "eval/{model}/gguf.json",
            caption="../report/gguf_quality.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "output": "GGUF quality"},
        ),
    params:
        model="merged/{model}",
        ggufs=repeated_option("gguf", "ggufs"),
        max_length=(
            ""
            if config["eval"]["perplexity"]["max_length"] is None
            else f"--max-length {config['eval']['perplexity']['max_length']}"
        ),
        stride=config["eval"]["perplexity"]["stride"],
        refs=gguf_quality_flags,
    log:
        "logs/eval/{model}/gguf.log",
    benchmark:
        "logs/benchmarks/eval/{model}/gguf.tsv"
    threads: 2
    resources:
        mem_mb=eval_mem_mb,
        runtime=eval_runtime(30),
    conda:
        "../envs/evaluate.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} gguf-quality --model {params.model:q} {params.ggufs} "
        "--text {input.text:q} --prompts {input.prompts:q} {params.max_length} --stride {params.stride} "
        "--threads {threads} --output {output:q} {params.refs} > {log:q} 2>&1"


rule eval_gguf_plot:
    input:
        script="scripts/evaluate.py",
        lib=script_lib("scripts/evaluate.py"),
        qualities=gguf_qualities,
    output:
        report(
            GGUF_PLOT,
            caption="../report/plot_gguf_quality.rst",
            category="Evaluation",
            subcategory="All models",
            labels={"plot": "GGUF quality"},
        ),
    params:
        qualities=repeated_option("quality", "qualities"),
    log:
        "logs/eval/gguf_plot.log",
    benchmark:
        "logs/benchmarks/eval/gguf_plot.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/evaluate.yaml"
    shell:
        "python {input.script:q} gguf-plot {params.qualities} --output {output:q} > {log:q} 2>&1"
