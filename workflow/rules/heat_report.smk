"""The heat family's tables and figures, each marked for `snakemake --report`."""


rule aggregate:
    input:
        heat.metrics_targets(),
    output:
        summary=f"{RESULTS}/tables/summary.csv",
        html=report(
            f"{RESULTS}/tables/summary.html",
            category=RESULTS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/summary.rst",
            labels={"shows": "test metrics of every model (tables)"},
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
        metrics=heat.smoe_metrics_targets(),
        mask=heat.mask_file(),
    output:
        png=report(
            f"{RESULTS}/figures/routing.png",
            category=RESULTS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/routing.rst",
            labels={"shows": "routing maps: learned beside true"},
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
        heat.kernel_metrics_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/kernels.png",
            category=RESULTS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/kernels.rst",
            labels={"shows": "learned kernels beside the true stencils"},
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
        heat.first_seed_predictions(),
    output:
        png=report(
            f"{RESULTS}/figures/predictions.png",
            category=RESULTS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/predictions.rst",
            labels={"shows": "one test sample, every model"},
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
        heat.history_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/learning_curves.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/curves.rst",
            labels={"shows": "learning curves of every model"},
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
        heat.metrics_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/metric_bars.png",
            category=RESULTS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/bars.rst",
            labels={"shows": "test metrics of every model (chart)"},
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


rule figure_dynamics:
    input:
        heat.smoe_history_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/smoe_dynamics.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/dynamics.rst",
            labels={"shows": "SMoE routing per epoch"},
        ),
        svg=f"{RESULTS}/figures/smoe_dynamics.svg",
    log:
        f"{RESULTS}/logs/report/figure_dynamics.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure dynamics --histories {input} --out {output.png} > {log} 2>&1"


rule figure_experts:
    input:
        heat.smoe_metrics_targets(),
    output:
        png=report(
            f"{RESULTS}/figures/expert_regions.png",
            category=DIAGNOSTICS_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/experts.rst",
            labels={"shows": "SMoE expert x region counts"},
        ),
        svg=f"{RESULTS}/figures/expert_regions.svg",
    log:
        f"{RESULTS}/logs/report/figure_experts.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "smoe figure experts --metrics {input} --out {output.png} > {log} 2>&1"
