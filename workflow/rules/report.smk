"""Report stage: tables of every evaluation, figures, and the marks for `snakemake --report`."""


rule aggregate:
    input:
        metrics_targets(),
    output:
        summary=report(
            f"{RESULTS}/tables/summary.csv",
            category="2 Tables",
            caption="../report/summary.rst",
            labels={"table": "test metrics"},
        ),
        markdown=f"{RESULTS}/tables/summary.md",
        long=f"{RESULTS}/tables/metrics_long.csv",
    log:
        f"{RESULTS}/logs/report/aggregate.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=output_folder,
    shell:
        "smoe aggregate {input} --out-dir {params.out} > {log} 2>&1"


rule figure_routing:
    input:
        metrics=smoe_metrics_targets(),
        mask=mask_file(),
    output:
        png=report(
            f"{RESULTS}/figures/routing.png",
            category="3 Figures",
            subcategory="SMoE",
            caption="../report/routing.rst",
            labels={"figure": "routing maps"},
        ),
        svg=f"{RESULTS}/figures/routing.svg",
    log:
        f"{RESULTS}/logs/report/figure_routing.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure routing --mask {input.mask} --metrics {input.metrics} "
        "--out {output.png} > {log} 2>&1"


rule figure_kernels:
    input:
        kernel_metrics_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/kernels.png",
            category="3 Figures",
            subcategory="SMoE",
            caption="../report/kernels.rst",
            labels={"figure": "learned kernels"},
        ),
        svg=f"{RESULTS}/figures/kernels.svg",
    log:
        f"{RESULTS}/logs/report/figure_kernels.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure kernels --metrics {input} --out {output.png} > {log} 2>&1"


rule figure_predictions:
    input:
        first_seed_predictions(),
    output:
        png=report(
            f"{RESULTS}/figures/predictions.png",
            category="3 Figures",
            subcategory="All models",
            caption="../report/predictions.rst",
            labels={"figure": "test sample"},
        ),
        svg=f"{RESULTS}/figures/predictions.svg",
    log:
        f"{RESULTS}/logs/report/figure_predictions.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "smoe figure predictions --predictions {input} --out {output.png} > {log} 2>&1"


rule figure_curves:
    input:
        history_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/learning_curves.png",
            category="3 Figures",
            subcategory="All models",
            caption="../report/curves.rst",
            labels={"figure": "learning curves"},
        ),
        svg=f"{RESULTS}/figures/learning_curves.svg",
    log:
        f"{RESULTS}/logs/report/figure_curves.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure curves --histories {input} --out {output.png} > {log} 2>&1"


rule figure_bars:
    input:
        metrics_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/metric_bars.png",
            category="3 Figures",
            subcategory="All models",
            caption="../report/bars.rst",
            labels={"figure": "metrics per model"},
        ),
        svg=f"{RESULTS}/figures/metric_bars.svg",
    log:
        f"{RESULTS}/logs/report/figure_bars.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure bars --metrics {input} --out {output.png} > {log} 2>&1"
