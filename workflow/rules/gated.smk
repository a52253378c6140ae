"""Gated modular MoE family (Krishnamurthy et al. 2023): the image data set converted into
train / val / test stores, a model per config entry (every seed in one job), its test
metrics, the table beside the published MNIST figures, and the routing and accuracy-usage
figures, all under results/gated/."""


rule gated_data:
    input:
        gated_source_inputs,
    output:
        directory(f"{GATED_DIR}/data/{{split}}.zarr"),
    log:
        f"{RESULTS}/logs/gated/data/{{split}}.log",
    wildcard_constraints:
        split=GATED_WILDCARDS["split"],
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        args=gated_data_args,
    shell:
        "smoe gated-data {params.args} --split {wildcards.split} --out {output} > {log} 2>&1"


rule gated_train:
    """Every seed of one model, trained then evaluated in one job: a digits training takes
    seconds, about what starting PyTorch takes. A distilled model waits for its teacher.
    """
    input:
        train=gated_store("train"),
        val=gated_store("val"),
        test=gated_store("test"),
        builds_on=gated_dependency_inputs,
    output:
        best=gated_seed_outputs("models", "best.pt"),
        summary=gated_seed_outputs("models", "train.json"),
        history=gated_seed_outputs("models", "history.csv"),
        metrics=gated_seed_outputs("metrics"),
    log:
        f"{RESULTS}/logs/gated/train/{{model}}.log",
    wildcard_constraints:
        model=GATED_WILDCARDS["model"],
    conda:
        SMOE_ENV
    threads: gated_train_threads
    resources:
        gpu=gated_train_gpus,
        mem_mb=gated_train_mem_mb,
        runtime=gated_train_runtime,
        processes=gated_train_processes,
    params:
        spec=gated_spec_json,
        models=gated_model_dir,
        metrics=gated_metrics_dir,
        builds_on=gated_dependency_args,
        seeds=" ".join(GATED_SEEDS),
    shell:
        "smoe gated-run --spec {params.spec:q} --train-store {input.train} "
        "--val-store {input.val} --test-store {input.test} --seeds {params.seeds} "
        "--models-dir {params.models} --metrics-dir {params.metrics} {params.builds_on} "
        "--processes {resources.processes} --no-progress > {log} 2>&1"


rule gated_aggregate:
    input:
        gated_metrics_targets(),
    output:
        csv=GATED_TABLES["csv"],
        markdown=GATED_TABLES["markdown"],
        html=report(
            GATED_TABLES["html"],
            category=RESULTS_CATEGORY,
            subcategory=GATED_FAMILY,
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
        gated_moe_metrics_targets(),
    output:
        png=report(
            f"{GATED_DIR}/figures/routing.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=GATED_FAMILY,
            caption="../report/gated_routing.rst",
            labels={"shows": "test samples of each class per expert"},
        ),
        svg=f"{GATED_DIR}/figures/routing.svg",
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
        gated_metrics_targets(),
    output:
        png=report(
            f"{GATED_DIR}/figures/accuracy_usage.png",
            category=RESULTS_CATEGORY,
            subcategory=GATED_FAMILY,
            caption="../report/gated_accuracy_usage.rst",
            labels={"shows": "test accuracy against expert usage entropy"},
        ),
        svg=f"{GATED_DIR}/figures/accuracy_usage.svg",
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
        gated_table_inputs(),


rule gated:
    input:
        gated_targets(),
