# Streaming LoRA merge: merged/{model}/ = base + adapters in order, as a Hugging Face folder.


rule merge_lora:
    input:
        script="scripts/merge_lora.py",
        lib=script_lib("scripts/merge_lora.py"),
        base=lambda wc: folder_files(model_base_dir(wc.model)),
        loras=lambda wc: [f for lora in model_cfg(wc.model)["loras"] for f in folder_files(lora)],
        tokenizer=lambda wc: folder_files(model_cfg(wc.model)["tokenizer"]) if model_cfg(wc.model)["tokenizer"] else [],
    output:
        directory("merged/{model}"),
    params:
        base=lambda wc: model_base_dir(wc.model),
        loras=lambda wc: " ".join(f"--lora {shell_quote(lora)}" for lora in model_cfg(wc.model)["loras"]),
        tokenizer=lambda wc: (
            f"--tokenizer {shell_quote(model_cfg(wc.model)['tokenizer'])}" if model_cfg(wc.model)["tokenizer"] else ""
        ),
        dtype=lambda wc: model_cfg(wc.model)["dtype"],
        max_shard_size=lambda wc: model_cfg(wc.model)["max_shard_size"],
        device=lambda wc: model_cfg(wc.model)["device"],
    log:
        "logs/merge/{model}.log",
    benchmark:
        "logs/benchmarks/merge/{model}.tsv"
    threads: 2
    resources:
        mem_mb=merge_mem_mb,
        runtime=lambda wc, input: 10 + input_mb(input) // 200,
        gpu=lambda wc: 1 if model_cfg(wc.model)["device"] == "cuda" else 0,
    conda:
        "../envs/merge.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --base {params.base:q} {params.loras} {params.tokenizer} "
        "--output {output:q} --dtype {params.dtype} --max-shard-size '{params.max_shard_size}' "
        "--device {params.device} > {log:q} 2>&1"
