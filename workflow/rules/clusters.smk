"""Synthetic-cluster family (Chen et al. 2022): one zarr store per setting and split, a model
per setting x model x seed, its test metrics, the table beside the published figures, and the
dispatch and projection figures, all under results/clusters/."""

from smoe.families.clusters.workflow import ClusterRules

clusters = ClusterRules(config, RESULTS)
CLUSTERS_TITLE = family_title("clusters")
FAMILY_RULES["clusters"] = clusters


rule cluster_data:
    output:
        clusters.cluster_store("{setting}", "{split}"),
    log:
        f"{RESULTS}/logs/clusters/data/{{setting}}_{{split}}.log",
    wildcard_constraints:
        **clusters.CLUSTER_WILDCARDS,
    priority: 25
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=clusters.cluster_data_mem_mb,
        runtime=10,
    params:
        args=clusters.cluster_data_args,
    shell:
        "smoe cluster-data {params.args} --split {wildcards.split} --out {output} "
        "--overwrite > {log} 2>&1"


rule cluster_train:
    """Every seed of one model on one setting, trained then evaluated in one job: a
    full-batch training takes seconds, about what starting PyTorch takes."""
    input:
        train=clusters.cluster_store("{setting}", "train"),
        test=clusters.cluster_store("{setting}", "test"),
    output:
        best=clusters.cluster_seed_outputs("models", "best.pt"),
        summary=clusters.cluster_seed_outputs("models", "train.json"),
        history=clusters.cluster_seed_outputs("models", "history.csv"),
        metrics=clusters.cluster_seed_outputs("metrics"),
    log:
        f"{RESULTS}/logs/clusters/train/{{setting}}_{{model}}.log",
    wildcard_constraints:
        **clusters.CLUSTER_WILDCARDS,
    # after the heat trainings: the single nonlinear CNN (three seeds, about a minute) is
    # the longest job after them, and the last job to start runs alone at the end
    priority: 20
    conda:
        SMOE_ENV
    threads: clusters.cluster_train_threads
    resources:
        gpu=clusters.cluster_train_gpus,
        mem_mb=clusters.cluster_train_mem_mb,
        runtime=clusters.cluster_train_runtime,
    params:
        spec=clusters.cluster_spec_json,
        models=clusters.cluster_model_dir,
        metrics=clusters.cluster_metrics_dir,
        seeds=" ".join(clusters.CLUSTER_SEEDS),
    shell:
        "smoe cluster-run --spec {params.spec:q} --train-store {input.train} "
        "--test-store {input.test} --seeds {params.seeds} --models-dir {params.models} "
        "--metrics-dir {params.metrics} --no-progress > {log} 2>&1"


rule cluster_aggregate:
    input:
        metrics=clusters.cluster_metrics_targets(),
        # the table reads each setting's test store to tell whether the published
        # figures apply (the paper's generator parameters)
        stores=[
            clusters.cluster_store(setting, "test")
            for setting in clusters.CLUSTER_SETTINGS
        ],
    output:
        csv=clusters.CLUSTER_TABLES["csv"],
        markdown=clusters.CLUSTER_TABLES["markdown"],
        html=report(
            clusters.CLUSTER_TABLES["html"],
            category=RESULTS_CATEGORY,
            subcategory=CLUSTERS_TITLE,
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
        clusters.cluster_moe_metrics_targets(),
    output:
        png=report(
            f"{clusters.CLUSTER_DIR}/figures/dispatch.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=CLUSTERS_TITLE,
            caption="../report/clusters_dispatch.rst",
            labels={"shows": "samples of each cluster per MoE expert"},
        ),
        svg=f"{clusters.CLUSTER_DIR}/figures/dispatch.svg",
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
        clusters.cluster_store("{setting}", "train"),
    output:
        png=report(
            f"{clusters.CLUSTER_DIR}/figures/projection_{{setting}}.png",
            category=DATA_CATEGORY,
            subcategory=CLUSTERS_TITLE,
            caption="../report/clusters_projection.rst",
            labels={
                "shows": "train samples projected on the generating vectors",
                "setting": "{setting}",
            },
        ),
        svg=f"{clusters.CLUSTER_DIR}/figures/projection_{{setting}}.svg",
    log:
        f"{RESULTS}/logs/clusters/figure_projection_{{setting}}.log",
    wildcard_constraints:
        **clusters.CLUSTER_WILDCARDS,
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
        clusters.cluster_table_inputs(),


rule clusters:
    input:
        clusters.cluster_targets(),
