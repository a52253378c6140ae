"""The page saying which config and software made the results, for every family."""


rule provenance:
    input:
        provenance_inputs,
    output:
        html=report(
            f"{RESULTS}/report/provenance.html",
            category=PROVENANCE_CATEGORY,
            caption="../report/provenance.rst",
            labels={"shows": "resolved config and software versions"},
        ),
        config=f"{RESULTS}/report/config.yaml",
        versions=f"{RESULTS}/report/versions.json",
    log:
        f"{RESULTS}/logs/report/provenance.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=resolved_config_json(),
    shell:
        "smoe provenance --config-json {params.config:q} --out {output.html} > {log} 2>&1"
