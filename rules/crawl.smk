# Instruction data from an OpenAI-compatible chat API (Chinese-LLaMA-Alpaca's crawl_prompt.py
# recipe): data/instructions/{name}.json for each entry of config["crawl"].
#
# Not in the default target: it needs OPENAI_API_KEY and it costs money. The key is read from
# the environment only, never from the config, so it stays out of logs and Snakemake's records;
# the server is the entry's base_url, else $OPENAI_BASE_URL, else OpenAI's. Build one data set:
#     snakemake --cores 1 data/instructions/<name>.json
#
# Only the Alpaca JSON list and the stats are declared as outputs. The crawl's working files,
# <name>.jsonl (accepted items) and <name>.raw.jsonl (every paid-for reply), are side files that
# the script appends to and resumes from: Snakemake deletes the outputs of a failed or killed
# job, so declaring them (even protected()) would throw away answers already paid for or block
# the resume. After a failure, asking for the same target again sends only the requests that
# have no reply yet; raising num_requests (a param, so the job reruns) sends only the extra ones.
#
# The job needs outbound network access: on a cluster whose compute nodes have none, declare
# `localrules: crawl_prompts` in the Snakefile so that it runs on the submit host.


rule crawl_prompts:
    input:
        script="scripts/crawl_prompts.py",
        lib=script_lib("scripts/crawl_prompts.py"),
    output:
        json="data/instructions/{name}.json",
        stats="data/instructions/{name}.stats.json",
    params:
        jsonl="data/instructions/{name}.jsonl",
        model=crawl_setting("model"),
        num_requests=crawl_setting("num_requests"),
        concurrency=crawl_setting("concurrency"),
        base_url=crawl_base_url_flag,
        items_per_request=crawl_setting("items_per_request"),
        seed=crawl_setting("seed"),
        max_retries=crawl_setting("max_retries"),
        timeout=crawl_setting("timeout"),
        dedup_threshold=crawl_setting("dedup_threshold"),
        price_in=crawl_setting("price_in"),
        price_out=crawl_setting("price_out"),
    wildcard_constraints:
        # Only configured names ("(?!)" matches nothing), so other data/instructions/ files are
        # never taken for crawls.
        name="|".join(re.escape(name) for name in config["crawl"]) or "(?!)",
    log:
        "logs/crawl/{name}.log",
    benchmark:
        "logs/benchmarks/crawl/{name}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=crawl_runtime,
    conda:
        "../envs/crawl.yaml"
    shell:
        "python {input.script:q} --output {params.jsonl:q} --alpaca-json {output.json:q}"
        " --num-requests {params.num_requests} --concurrency {params.concurrency}"
        " --model {params.model:q} {params.base_url} --items-per-request {params.items_per_request}"
        " --seed {params.seed} --max-retries {params.max_retries} --timeout {params.timeout}"
        " --dedup-threshold {params.dedup_threshold} --price-in {params.price_in} --price-out {params.price_out}"
        " > {log:q} 2>&1"
