# llamaforge: reproducible builds of LLaMA-family models with extended vocabularies.
#
#   snakemake --cores 4                 everything for the models in config.yaml (the demo by default)
#   snakemake --cores 4 merged/demo     one target; see README.md for the list
#   snakemake --profile profiles/slurm  the same on a SLURM cluster

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tokenizer.smk"
include: "rules/merge.smk"
include: "rules/export.smk"
include: "rules/imatrix.smk"
include: "rules/evaluate.smk"
include: "rules/multiple_choice.smk"
include: "rules/crawl.smk"


rule all:
    input:
        all_targets(),
    default_target: True
