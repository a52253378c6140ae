"""SMoE layer and training throughput, measured side by side in one run.

1. Forward + backward time of an SMoE layer against a plain ``Conv2d`` with E output
   channels (the experts alone, no routing), for the paper's heat layer and for a wider
   hidden layer; the ratio is what routing, gating and the RC/damping backward cost.
2. Training samples/s of the paper's model against the samples/s the loader alone delivers
   (how far the data path is from being the bottleneck).
3. With CUDA: epochs/s of the quick config's SMoE training in float32 and in mixed
   precision (bf16 and fp16) on the GPU.

    python benchmarks/bench_smoe_layer.py [--repeats 7] [--store results/data/heat/train.zarr]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from smoe.families.heat.dataset import HeatPairs, loader
from smoe.families.heat.mask import generate_mask
from smoe.nn.layer import SMoELayer
from smoe.nn.routing import RoutingOptions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(
    module: nn.Module, x: torch.Tensor, target: torch.Tensor, device, steps: int, amp_dtype=None
) -> float:
    """Median seconds of one forward + backward over ``steps`` calls (after warm-up)."""

    def step():
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            out = module(x)
        loss = (out.float() - target).pow(2).mean()
        loss.backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_cases(device):
    mask = torch.as_tensor(generate_mask(64, 64, 3, seed=42))
    paper = RoutingOptions(experts=3, k=1, rc_loss=True, damping=True, quantile=0.3)
    wide = RoutingOptions(experts=8, k=2, rc_loss=True, damping=True, quantile=0.3)
    return [
        ("paper heat layer: C=1, E=3, K=1, latent gate", 1, paper, 1, 32),
        ("hidden layer: C=16, E=8 x 4 filters, K=2, conv gate", 16, wide, 4, 32),
    ], mask


def bench_layers(device, repeats: int) -> None:
    cases, mask = layer_cases(device)
    print(f"\n1. SMoE layer vs Conv2d with E output channels, forward + backward ({device})")
    print(f"{'case':52s} {'conv ms':>8s} {'smoe ms':>8s} {'ratio':>6s}")
    for name, channels, routing, filters, batch in cases:
        gate = "latent" if routing.experts == 3 else "conv"
        layer = SMoELayer(
            channels, 64, 64, routing, filters=filters, gate=gate, mask=mask, combine="sum"
        ).to(device)
        conv = nn.Conv2d(channels, routing.experts * filters, 3, padding=1, bias=False).to(device)
        x = torch.rand(batch, channels, 64, 64, device=device)
        target_smoe = torch.rand(batch, filters, 64, 64, device=device)
        target_conv = torch.rand(batch, routing.experts * filters, 64, 64, device=device)
        ratios, conv_ms, smoe_ms = [], [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            c = time_step(conv, x, target_conv, device, 10)
            s = time_step(layer, x, target_smoe, device, 10)
            conv_ms.append(c * 1e3)
            smoe_ms.append(s * 1e3)
            ratios.append(s / c)
        print(
            f"{name:52s} {statistics.median(conv_ms):8.3f} {statistics.median(smoe_ms):8.3f} "
            f"{statistics.median(ratios):5.2f}x"
        )


def bench_training_vs_loader(store: Path, device, repeats: int) -> None:
    from smoe.nn.layer import SMoENet

    dataset = HeatPairs(store)
    mask = dataset.mask
    model = SMoENet(
        1,
        dataset.height,
        dataset.width,
        mask=mask,
        experts=3,
        k=1,
        rc_loss=True,
        damping=True,
        quantile=0.3,
        expert_init="identity",
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    batches = 200
    generator = torch.Generator().manual_seed(0)

    def loader_rate():
        start = time.perf_counter()
        n = 0
        for i, (x, y) in enumerate(loader(dataset, 32, True, generator)):
            x, y = x.to(device), y.to(device)
            n += len(x)
            if i + 1 == batches:
                break
        sync(device)
        return n / (time.perf_counter() - start)

    def train_rate():
        start = time.perf_counter()
        n = 0
        for i, (x, y) in enumerate(loader(dataset, 32, True, generator)):
            x, y = x.to(device), y.to(device)
            loss = (model(x) - y).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += len(x)
            if i + 1 == batches:
                break
        sync(device)
        return n / (time.perf_counter() - start)

    loader_rate(), train_rate()  # warm-up
    loads, trains = [], []
    for _ in range(repeats):
        loads.append(loader_rate())
        trains.append(train_rate())
    load, train = statistics.median(loads), statistics.median(trains)
    print(f"\n2. Training vs loader on {store} ({device}, batch 32, paper SMoE)")
    print(f"loader alone {load:10.0f} samples/s")
    print(
        f"training     {train:10.0f} samples/s  -> training runs at {train / load:.1%} of the "
        f"loader's rate (the loader is {'not ' if train < load / 2 else ''}the bottleneck)"
    )


def bench_gpu_epochs(store: Path, repeats: int) -> None:
    from smoe.nn.layer import SMoENet

    device = torch.device("cuda")
    dataset = HeatPairs(store)
    print(
        f"\n3. GPU epochs/s of the quick SMoE training ({torch.cuda.get_device_name()}, "
        f"{len(dataset)} pairs, batch 32)"
    )
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = SMoENet(
            1,
            dataset.height,
            dataset.width,
            mask=dataset.mask,
            experts=3,
            k=1,
            rc_loss=True,
            damping=True,
            quantile=0.3,
            expert_init="identity",
        ).to(device)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        rates = []
        for epoch in range(repeats + 1):
            generator = torch.Generator().manual_seed(epoch)
            sync(device)
            start = time.perf_counter()
            for x, y in loader(dataset, 32, True, generator):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(
                    "cuda", dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    pred = model(x)
                loss = (pred.float() - y).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            sync(device)
            if epoch:  # the first epoch warms up kernels and caches
                rates.append(1.0 / (time.perf_counter() - start))
        print(f"{name}: {statistics.median(rates):6.2f} epochs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--store", type=Path, default=Path("results/data/heat/train.zarr"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench_layers(device, args.repeats)
    if args.store.exists():
        bench_training_vs_loader(args.store, device, args.repeats)
    else:
        print(f"\n2. skipped: {args.store} does not exist (run `snakemake --cores 2` first)")
    if torch.cuda.is_available() and args.store.exists():
        bench_gpu_epochs(args.store, max(2, args.repeats // 2))
    else:
        print("\n3. skipped: no CUDA device")


if __name__ == "__main__":
    main()
