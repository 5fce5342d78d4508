# Streaming LoRA merge: merged/{model}/ = base + adapters in order, as a Hugging Face folder.


rule merge_lora:
    input:
        script="scripts/merge_lora.py",
        lib=script_lib("scripts/merge_lora.py"),
        base=base_dir_files,
        loras=lora_files,
        tokenizer=model_tokenizer_files,
    output:
        directory("merged/{model}"),
    params:
        base=base_dir,
        loras=lora_flags,
        tokenizer=model_tokenizer_flag,
        dtype=model_setting("dtype"),
        max_shard_size=model_setting("max_shard_size"),
        device=model_setting("device"),
    log:
        "logs/merge/{model}.log",
    benchmark:
        "logs/benchmarks/merge/{model}.tsv"
    threads: 2
    resources:
        mem_mb=merge_mem_mb,
        runtime=merge_runtime,
        gpu=merge_gpu,
    conda:
        "../envs/merge.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python {input.script:q} --base {params.base:q} {params.loras} {params.tokenizer} "
        "--output {output:q} --dtype {params.dtype} --max-shard-size '{params.max_shard_size}' "
        "--device {params.device} > {log:q} 2>&1"
