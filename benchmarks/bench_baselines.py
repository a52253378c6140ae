"""The heat baselines' training steps (CNN, CoordConv, LCN at the default config's shapes)
against a baseline revision and against the machine's measured peak, side by side.

A step is what the trainer does per batch: forward, MSE loss, backward, Adam; batch 32 of
64 x 64 fields on the paper's region map, on ``--threads`` threads (the default config
trains with 1). The same script runs under a ``git worktree`` of ``--baseline`` (through
``PYTHONPATH``) and under this checkout, alternately, ``--repeats`` times; each run prints
its median step over ``--steps`` steps. The peak is the median GFLOP/s of a 2048 x 2048
float32 matrix product on the same threads; a step's FLOPs are its layers' multiply-adds
(2 FLOPs each) forward, for the weight gradient and, past the first layer, for the input
gradient, so "of peak" says how far a step is from what the core does.

    python benchmarks/bench_baselines.py [--threads 1] [--repeats 3] [--steps 60]
        [--baseline REV] [--dir /tmp/smoe-bench-baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from worktrees import baseline_tree

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "f4b562f"
"""main before the whole-workflow speed work (issue 21)."""
KINDS = {"cnn": {"hidden": [4]}, "coordconv": {"hidden": [4]}, "lcn": {}}


def _median_seconds(step, steps: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_flops(model, x) -> int:
    """Multiply-adds x 2 of a step's convolutions and locally connected layers."""
    import torch

    layers = []

    def record(module, inputs, output):
        weight = module.weight
        per_output = weight[0].numel() if weight.dim() == 4 else weight.shape[1]
        layers.append(output.numel() * per_output)

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if type(m).__name__ in ("Conv2d", "DirectConv2d", "CoordConv2d", "LocallyConnected2d")
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    passes = [2] + [3] * (len(layers) - 1)  # forward + weight gradient (+ input gradient)
    return sum(2 * macs * n for macs, n in zip(layers, passes, strict=True))


def measure(threads: int, steps: int) -> dict:
    """Run in the revision under test: median step seconds and FLOPs per kind, and the peak."""
    import numpy as np
    import torch

    from smoe.families.heat.registry import build_model

    torch.set_num_threads(threads)
    mask = np.load(ROOT / "tests" / "fixtures" / "paper_mask.npy")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 64, 64, generator=g), torch.rand(32, 1, 64, 64, generator=g)
    out = {}
    for kind, options in KINDS.items():
        torch.manual_seed(0)
        model = build_model(
            kind, options, 1, 64, 64, mask=mask, region_diffusivity=(0.0025, 0.025, 0.25)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=0.03)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()

        out[kind] = {"seconds": _median_seconds(step, steps), "flops": step_flops(model, x)}
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    matmul = _median_seconds(lambda: a @ b, 10)
    out["peak_gflops"] = 2 * 2048**3 / matmul / 1e9
    return out


def run_tree(tree: Path, threads: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure"]
    command += ["--threads", str(threads), "--steps", str(steps)]
    result = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{tree}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/smoe-bench-baselines"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.threads, args.steps)))
        return
    trees = {"baseline": baseline_tree(args.dir, args.baseline), "ours": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(run_tree(tree, args.threads, args.steps))
            steps = ", ".join(
                f"{kind} {1000 * runs[name][-1][kind]['seconds']:.2f} ms" for kind in KINDS
            )
            print(f"repeat {repeat + 1} {name:8s}: {steps}", flush=True)
    peak = statistics.median(r["peak_gflops"] for name in trees for r in runs[name])
    print(f"\npeak: {peak:.1f} GFLOP/s (2048^2 float32 matmul, {args.threads} thread(s), median)")
    print(f"{'kind':10s} {'baseline ms':>12s} {'ours ms':>9s} {'speed-up':>9s} {'of peak':>8s}")
    for kind in KINDS:
        base = statistics.median(r[kind]["seconds"] for r in runs["baseline"])
        ours = statistics.median(r[kind]["seconds"] for r in runs["ours"])
        flops = runs["ours"][0][kind]["flops"]
        fraction = flops / ours / 1e9 / peak
        print(
            f"{kind:10s} {1000 * base:12.2f} {1000 * ours:9.2f} {base / ours:8.2f}x {fraction:8.1%}"
        )


if __name__ == "__main__":
    main()
