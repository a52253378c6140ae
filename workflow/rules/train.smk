"""Model stage: train every model x seed of the config, then evaluate its best checkpoint."""


rule train:
    input:
        train=store_file("train"),
        val=store_file("val"),
    output:
        best=f"{RESULTS}/models/{{model}}/seed{{seed}}/best.pt",
        summary=f"{RESULTS}/models/{{model}}/seed{{seed}}/train.json",
        history=f"{RESULTS}/models/{{model}}/seed{{seed}}/history.csv",
    log:
        f"{RESULTS}/logs/train/{{model}}_seed{{seed}}.log",
    conda:
        SMOE_ENV
    threads: train_threads
    resources:
        gpu=train_gpus,
        mem_mb=train_mem_mb,
        runtime=train_runtime,
        processes=train_processes,
    params:
        spec=model_spec_json,
        out=model_dir,
    shell:
        "smoe train --spec {params.spec:q} --train-store {input.train} "
        "--val-store {input.val} --seed {wildcards.seed} --out {params.out} "
        "--processes {resources.processes} > {log} 2>&1"


rule evaluate:
    input:
        best=f"{RESULTS}/models/{{model}}/seed{{seed}}/best.pt",
        test=store_file("test"),
    output:
        metrics=f"{RESULTS}/metrics/{{model}}/seed{{seed}}.json",
        predictions=f"{RESULTS}/predictions/{{model}}/seed{{seed}}.nc",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}_seed{{seed}}.log",
    conda:
        SMOE_ENV
    threads: 1
    resources:
        gpu=train_gpus,
        mem_mb=4000,
        runtime=30,
    params:
        device=evaluate_device,
    shell:
        "smoe evaluate --checkpoint {input.best} --store {input.test} --device {params.device} "
        "--out {output.metrics} --predictions {output.predictions} > {log} 2>&1"
