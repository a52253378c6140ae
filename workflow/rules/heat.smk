"""The heat-diffusion family (Dryden & Hoefler 2022): the region map, one zarr store per
split (and netCDF copies), every model x seed trained and evaluated; its tables and figures
in heat_report.smk. Paths, arguments and resources come from
smoe.families.heat.workflow.HeatRules."""

from smoe.families.heat.config import SPLITS as HEAT_SPLITS
from smoe.families.heat.workflow import HeatRules

heat = HeatRules(config, RESULTS)
HEAT_TITLE = family_title("heat")
FAMILY_RULES["heat"] = heat


wildcard_constraints:
    split="|".join(HEAT_SPLITS),
    model="|".join(map(re.escape, config["models"])) or "no-models",
    seed=r"\d+",


rule mask:
    input:
        heat.mask_inputs,
    output:
        mask=f"{RESULTS}/data/mask.npy",
        png=report(
            f"{RESULTS}/data/mask.png",
            category=DATA_CATEGORY,
            subcategory=HEAT_TITLE,
            caption="../report/mask.rst",
            labels={"shows": "region map (region type of every cell)"},
        ),
    log:
        f"{RESULTS}/logs/data/mask.log",
    # the heat data feeds the longest trainings: made first
    priority: 40
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        args=heat.mask_args,
    shell:
        "smoe mask {params.args} --out {output.mask} --png {output.png} > {log} 2>&1"


rule simulate:
    input:
        mask=rules.mask.output.mask,
    output:
        heat.store_file("{split}"),
    log:
        f"{RESULTS}/logs/data/simulate_{{split}}.log",
    priority: 40
    conda:
        SMOE_ENV
    threads: heat.CFG.threads
    resources:
        mem_mb=heat.simulate_mem_mb,
        runtime=heat.simulate_runtime,
        # where the dask tasks run changes no value: a resource, not a param, so that
        # switching compute.scheduler rebuilds no store
        scheduler=heat.CFG.scheduler,
    params:
        args=heat.simulate_args,
    shell:
        "smoe simulate --mask {input.mask} {params.args} --scheduler {resources.scheduler} "
        "--workers {threads} --out {output} --overwrite > {log} 2>&1"


rule export_netcdf:
    input:
        heat.store_file("{split}"),
    output:
        f"{RESULTS}/data/heat/{{split}}.nc",
    log:
        f"{RESULTS}/logs/data/export_{{split}}.log",
    conda:
        SMOE_ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "smoe export {input} {output} --workers {threads} > {log} 2>&1"


rule train:
    input:
        train=heat.store_file("train"),
        val=heat.store_file("val"),
    output:
        best=f"{RESULTS}/models/{{model}}/seed{{seed}}/best.pt",
        summary=f"{RESULTS}/models/{{model}}/seed{{seed}}/train.json",
        history=f"{RESULTS}/models/{{model}}/seed{{seed}}/history.csv",
    log:
        f"{RESULTS}/logs/train/{{model}}_seed{{seed}}.log",
    # the longest jobs start first, so no training runs alone at the end
    priority: 30
    conda:
        SMOE_ENV
    threads: heat.train_threads
    resources:
        gpu=heat.train_gpus,
        mem_mb=heat.train_mem_mb,
        runtime=heat.train_runtime,
        processes=heat.train_processes,
    params:
        spec=heat.model_spec_json,
        out=heat.model_dir,
    shell:
        "smoe train --spec {params.spec:q} --train-store {input.train} "
        "--val-store {input.val} --seed {wildcards.seed} --out {params.out} "
        "--processes {resources.processes} > {log} 2>&1"


rule evaluate:
    input:
        best=f"{RESULTS}/models/{{model}}/seed{{seed}}/best.pt",
        test=heat.store_file("test"),
    output:
        metrics=f"{RESULTS}/metrics/{{model}}/seed{{seed}}.json",
        predictions=f"{RESULTS}/predictions/{{model}}/seed{{seed}}.nc",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}_seed{{seed}}.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        gpu=heat.train_gpus,
        mem_mb=4000,
        runtime=30,
    params:
        device=heat.evaluate_device,
    shell:
        "smoe evaluate --checkpoint {input.best} --store {input.test} --device {params.device} "
        "--out {output.metrics} --predictions {output.predictions} > {log} 2>&1"


include: "heat_report.smk"
