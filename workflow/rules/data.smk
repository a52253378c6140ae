"""Data stage: the region map, one heat-diffusion zarr store per split, netCDF copies."""


rule mask:
    input:
        mask_inputs,
    output:
        mask=f"{RESULTS}/data/mask.npy",
        png=report(
            f"{RESULTS}/data/mask.png",
            category=DATA_CATEGORY,
            subcategory=FAMILY,
            caption="../report/mask.rst",
            labels={"shows": "region map (region type of every cell)"},
        ),
    log:
        f"{RESULTS}/logs/data/mask.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        args=mask_args,
    shell:
        "smoe mask {params.args} --out {output.mask} --png {output.png} > {log} 2>&1"


rule simulate:
    input:
        mask=rules.mask.output.mask,
    output:
        directory(f"{RESULTS}/data/heat/{{split}}.zarr"),
    log:
        f"{RESULTS}/logs/data/simulate_{{split}}.log",
    conda:
        SMOE_ENV
    threads: CFG.threads
    resources:
        mem_mb=simulate_mem_mb,
        runtime=simulate_runtime,
        # where the dask tasks run changes no value: a resource, not a param, so that
        # switching compute.scheduler rebuilds no store
        scheduler=CFG.scheduler,
    params:
        args=simulate_args,
    shell:
        "smoe simulate --mask {input.mask} {params.args} --scheduler {resources.scheduler} "
        "--workers {threads} --out {output} > {log} 2>&1"


rule export_netcdf:
    input:
        f"{RESULTS}/data/heat/{{split}}.zarr",
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
