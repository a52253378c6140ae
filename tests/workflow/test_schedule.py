"""The default workflow's shape on a 2-core machine, as `snakemake -n` plans it: the longest
trainings start first and the shortest last, and no data job waits for two free cores."""

import re

from snakemake_runs import run_snakemake


def planned_jobs(output: str) -> list[dict]:
    """Each job a dry run prints: its rule, wildcards, priority and threads."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", output):
        rule = re.match(r"rule (\w+):", block)
        if not rule:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        priority = re.search(r"^\s+priority: (\d+)$", block, re.M)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        jobs.append(
            {
                "rule": rule.group(1),
                "wildcards": wildcards.group(1) if wildcards else "",
                "priority": int(priority.group(1)) if priority else 0,
                "threads": int(threads.group(1)) if threads else 1,
            }
        )
    return jobs


def test_the_default_config_starts_the_longest_trainings_first(repo, tmp_path):
    result = run_snakemake(repo, tmp_path, "-n", configfile=repo / "config" / "config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)

    def priorities(rule, wildcard=""):
        found = {j["priority"] for j in jobs if j["rule"] == rule and wildcard in j["wildcards"]}
        assert found, (rule, wildcard)
        return found

    # heat data, then its trainings, then the clusters', then the gated mixtures, and the
    # single expert (the shortest training) last
    (simulate,) = priorities("simulate")
    (heat,) = priorities("train")
    (clusters,) = priorities("cluster_train")
    (mixture,) = priorities("gated_train", "model=top2")
    (single,) = priorities("gated_train", "model=single")
    assert simulate > heat > clusters > mixture > single > max(priorities("evaluate"))
    # a 2-core simulation would wait until both cores are free, after every other training
    assert {j["threads"] for j in jobs if j["rule"] == "simulate"} == {1}
    assert len(jobs) == 48
