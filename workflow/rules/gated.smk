"""Gated modular MoE family (Krishnamurthy et al. 2023): the image data set converted into
train / val / test stores, a model per config entry (every seed in one job), its test
metrics, the table beside the published MNIST figures, and the routing and accuracy-usage
figures, all under results/gated/."""

from smoe.families.gated.workflow import GatedRules

gated = GatedRules(config, RESULTS)
GATED_TITLE = family_title("gated")
FAMILY_RULES["gated"] = gated
INPUT_CHECKS.update(gated.input_checks())


rule gated_data:
    input:
        gated.gated_source_inputs,
    output:
        gated.gated_store("{split}"),
    log:
        f"{RESULTS}/logs/gated/data/{{split}}.log",
    wildcard_constraints:
        split=gated.GATED_WILDCARDS["split"],
    priority: 15
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        args=gated.gated_data_args,
    shell:
        "smoe gated-data {params.args} --split {wildcards.split} --out {output} "
        "--overwrite > {log} 2>&1"


rule gated_train:
    """Every seed of one model, trained then evaluated in one job: a digits training takes
    seconds, about what starting PyTorch takes. A distilled model waits for its teacher.
    """
    input:
        train=gated.gated_store("train"),
        val=gated.gated_store("val"),
        test=gated.gated_store("test"),
        builds_on=gated.gated_dependency_inputs,
    output:
        best=gated.gated_seed_outputs("models", "best.pt"),
        summary=gated.gated_seed_outputs("models", "train.json"),
        history=gated.gated_seed_outputs("models", "history.csv"),
        metrics=gated.gated_seed_outputs("metrics"),
    log:
        f"{RESULTS}/logs/gated/train/{{model}}.log",
    wildcard_constraints:
        model=gated.GATED_WILDCARDS["model"],
    # last, the single expert (the shortest) after the mixtures
    priority: gated.gated_train_priority
    conda:
        SMOE_ENV
    threads: gated.gated_train_threads
    resources:
        gpu=gated.gated_train_gpus,
        mem_mb=gated.gated_train_mem_mb,
        runtime=gated.gated_train_runtime,
        processes=gated.gated_train_processes,
    params:
        spec=gated.gated_spec_json,
        models=gated.gated_model_dir,
        metrics=gated.gated_metrics_dir,
        builds_on=gated.gated_dependency_args,
        seeds=" ".join(gated.GATED_SEEDS),
    shell:
        "smoe gated-run --spec {params.spec:q} --train-store {input.train} "
        "--val-store {input.val} --test-store {input.test} --seeds {params.seeds} "
        "--models-dir {params.models} --metrics-dir {params.metrics} {params.builds_on} "
        "--processes {resources.processes} --no-progress > {log} 2>&1"


rule gated_aggregate:
    input:
        gated.gated_metrics_targets(),
    output:
        csv=gated.GATED_TABLES["csv"],
        markdown=gated.GATED_TABLES["markdown"],
        html=report(
            gated.GATED_TABLES["html"],
            category=RESULTS_CATEGORY,
            subcategory=GATED_TITLE,
            caption="../report/gated_table.rst",
            labels={"shows": "test accuracy and specialisation (table)"},
        ),
    log:
        f"{RESULTS}/logs/gated/table.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=output_folder,
    shell:
        "smoe gated-table {input} --out-dir {params.out} > {log} 2>&1"


rule gated_figure_routing:
    input:
        gated.gated_moe_metrics_targets(),
    output:
        png=report(
            f"{gated.GATED_DIR}/figures/routing.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=GATED_TITLE,
            caption="../report/gated_routing.rst",
            labels={"shows": "test samples of each class per expert"},
        ),
        svg=f"{gated.GATED_DIR}/figures/routing.svg",
    log:
        f"{RESULTS}/logs/gated/figure_routing.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure gated-routing --metrics {input} --out {output.png} > {log} 2>&1"


rule gated_figure_accuracy_usage:
    input:
        gated.gated_metrics_targets(),
    output:
        png=report(
            f"{gated.GATED_DIR}/figures/accuracy_usage.png",
            category=RESULTS_CATEGORY,
            subcategory=GATED_TITLE,
            caption="../report/gated_accuracy_usage.rst",
            labels={"shows": "test accuracy against expert usage entropy"},
        ),
        svg=f"{gated.GATED_DIR}/figures/accuracy_usage.svg",
    log:
        f"{RESULTS}/logs/gated/figure_accuracy_usage.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure accuracy-usage --metrics {input} --out {output.png} > {log} 2>&1"


# Named targets: `snakemake --cores 2 gated_table` regenerates the table (every store,
# model and metric it needs); `snakemake --cores 2 gated` the whole family.


rule gated_table:
    input:
        gated.gated_table_inputs(),


rule gated:
    input:
        gated.gated_targets(),
