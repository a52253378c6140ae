"""Synthetic-cluster family (Chen et al. 2022): one zarr store per setting and split, a model
per setting x model x seed, its test metrics, the table beside the published figures, and the
dispatch and projection figures, all under results/clusters/."""


rule cluster_data:
    output:
        directory(f"{CLUSTER_DIR}/data/{{setting}}/{{split}}.zarr"),
    log:
        f"{RESULTS}/logs/clusters/data/{{setting}}_{{split}}.log",
    wildcard_constraints:
        **CLUSTER_WILDCARDS,
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=cluster_data_mem_mb,
        runtime=10,
    params:
        args=cluster_data_args,
    shell:
        "smoe cluster-data {params.args} --split {wildcards.split} --out {output} > {log} 2>&1"


rule cluster_train:
    """Every seed of one model on one setting, trained then evaluated in one job: a
    full-batch training takes seconds, about what starting PyTorch takes."""
    input:
        train=f"{CLUSTER_DIR}/data/{{setting}}/train.zarr",
        test=f"{CLUSTER_DIR}/data/{{setting}}/test.zarr",
    output:
        best=cluster_seed_outputs("models", "best.pt"),
        summary=cluster_seed_outputs("models", "train.json"),
        history=cluster_seed_outputs("models", "history.csv"),
        metrics=cluster_seed_outputs("metrics"),
    log:
        f"{RESULTS}/logs/clusters/train/{{setting}}_{{model}}.log",
    wildcard_constraints:
        **CLUSTER_WILDCARDS,
    conda:
        SMOE_ENV
    threads: cluster_train_threads
    resources:
        gpu=cluster_train_gpus,
        mem_mb=cluster_train_mem_mb,
        runtime=cluster_train_runtime,
    params:
        spec=cluster_spec_json,
        models=cluster_model_dir,
        metrics=cluster_metrics_dir,
        seeds=" ".join(CLUSTER_SEEDS),
    shell:
        "smoe cluster-run --spec {params.spec:q} --train-store {input.train} "
        "--test-store {input.test} --seeds {params.seeds} --models-dir {params.models} "
        "--metrics-dir {params.metrics} --no-progress > {log} 2>&1"


rule cluster_aggregate:
    input:
        metrics=cluster_metrics_targets(),
        # the table reads each setting's test store to tell whether the published
        # figures apply (the paper's generator parameters)
        stores=[cluster_store(setting, "test") for setting in CLUSTER_SETTINGS],
    output:
        csv=CLUSTER_TABLES["csv"],
        markdown=CLUSTER_TABLES["markdown"],
        html=report(
            CLUSTER_TABLES["html"],
            category=RESULTS_CATEGORY,
            subcategory=CLUSTERS_FAMILY,
            caption="../report/clusters_table.rst",
            labels={"shows": "test accuracy and dispatch entropy (table)"},
        ),
    log:
        f"{RESULTS}/logs/clusters/table.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=output_folder,
    shell:
        "smoe cluster-table {input.metrics} --out-dir {params.out} > {log} 2>&1"


rule cluster_figure_dispatch:
    input:
        cluster_moe_metrics_targets(),
    output:
        png=report(
            f"{CLUSTER_DIR}/figures/dispatch.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=CLUSTERS_FAMILY,
            caption="../report/clusters_dispatch.rst",
            labels={"shows": "samples of each cluster per MoE expert"},
        ),
        svg=f"{CLUSTER_DIR}/figures/dispatch.svg",
    log:
        f"{RESULTS}/logs/clusters/figure_dispatch.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure dispatch --metrics {input} --out {output.png} > {log} 2>&1"


rule cluster_figure_projection:
    input:
        f"{CLUSTER_DIR}/data/{{setting}}/train.zarr",
    output:
        png=report(
            f"{CLUSTER_DIR}/figures/projection_{{setting}}.png",
            category=DATA_CATEGORY,
            subcategory=CLUSTERS_FAMILY,
            caption="../report/clusters_projection.rst",
            labels={
                "shows": "train samples projected on the generating vectors",
                "setting": "{setting}",
            },
        ),
        svg=f"{CLUSTER_DIR}/figures/projection_{{setting}}.svg",
    log:
        f"{RESULTS}/logs/clusters/figure_projection_{{setting}}.log",
    wildcard_constraints:
        **CLUSTER_WILDCARDS,
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure projection --store {input} --out {output.png} > {log} 2>&1"


# Named targets: `snakemake --cores 2 clusters_table` regenerates the whole table (every
# store, model and metric it needs); `snakemake --cores 2 clusters` the whole family.


rule clusters_table:
    input:
        cluster_table_inputs(),


rule clusters:
    input:
        cluster_targets(),
