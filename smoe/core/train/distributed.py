"""Multi-process training under ``torchrun``: one global minibatch shared by the processes.

``torchrun --standalone --nproc-per-node N -m smoe train ...`` (or ``gated-train`` /
``gated-run``) starts N processes; each finds its rank in the environment torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and :func:`setup` joins them into one process
group (gloo on the CPU, nccl on CUDA, each process on GPU ``LOCAL_RANK``). Without torchrun
nothing here does anything: one process trains exactly as it always did.

What keeps N processes equal to one (the same results, to float rounding):

* every process draws the batch order from the same seeded generator, so all know the same
  global minibatch; process r takes its contiguous share (:func:`share`, sizes differ by at
  most one sample) and weights its mean loss by its share of the batch, so the gradient
  averaged by :class:`~torch.nn.parallel.DistributedDataParallel` is the one-process
  gradient of the whole batch (:func:`loss_weight`);
* batch normalisation normalises with the statistics of the whole global batch
  (:class:`GlobalBatchNorm2d`, which torch's ``SyncBatchNorm`` does not do on the CPU);
* regularisers over the batch see the whole batch (the family gathers what they need,
  :func:`gather_rows`), and random draws are made on the whole batch by every process;
* metrics summed over an epoch are summed over the processes (:func:`all_reduce_sum`);
  validation runs in full on every process, so the selected epoch is the one-process one;
* checkpoints, history and summary are written by rank 0 only; they hold nothing
  rank-specific (the plain model's state dict, the global generator), so a run stopped under
  N processes resumes under any other number.

:func:`smoe_command` gives the words that start a ``smoe`` call on N processes, for the
workflow rules.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from smoe.core.errors import InputError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} is not an integer") from None


def launched() -> World:
    """The world torchrun started this process in (read from the environment)."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < size:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size, local)


def is_main() -> bool:
    """Whether this process is rank 0 (always true without torchrun)."""
    return launched().main


def device_of(device: torch.device, world: World) -> torch.device:
    """The device of this process: on CUDA under torchrun, GPU ``LOCAL_RANK``."""
    if world.multi and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device: torch.device) -> World:
    """Join the process group torchrun launched (once per process; a no-op without
    torchrun): gloo when training on the CPU, nccl on CUDA."""
    world = launched()
    if world.multi and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
        atexit.register(teardown)
    return world


def teardown() -> None:
    """Leave the process group (registered at exit by :func:`setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synced() -> bool:
    """Whether several processes train together (an initialised group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if synced():
        dist.barrier()


def smoe_command(processes: int) -> str:
    """The words that start a ``smoe`` call on ``processes`` processes: ``smoe`` for one,
    ``torchrun --standalone --nproc-per-node N -m smoe`` otherwise (``--standalone``: a
    rendezvous on a free local port, so jobs sharing a node never collide)."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise InputError(f"processes must be a positive integer, got {processes!r}")
    if processes == 1:
        return "smoe"
    return f"torchrun --standalone --nproc-per-node {processes} -m smoe"


# -- sharing a global minibatch -----------------------------------------------------------


def share(n: int, world: World) -> tuple[int, int]:
    """Rows [start, stop) of a global batch of ``n`` that ``world.rank`` takes: contiguous
    shares in rank order, the first ``n % size`` one row larger."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def share_sizes(n: int, size: int) -> list[int]:
    base, extra = divmod(n, size)
    return [base + (rank < extra) for rank in range(size)]


def loss_weight(n_local: int, n_global: int, world: World) -> float:
    """The factor on this process's mean loss that makes the DDP-averaged gradient the
    gradient of the global batch's mean loss: share of the batch times the world size."""
    return n_local * world.size / n_global


def check_batches(n: int, batch_size: int, world: World, where: str) -> None:
    """Refuse a split in which some process would get an empty share of a minibatch."""
    if not world.multi:
        return
    smallest = n if n <= batch_size else (n % batch_size or batch_size)
    if smallest < world.size:
        raise InputError(
            f"{where}: with {world.size} processes every minibatch must hold at least "
            f"{world.size} samples, but one holds {smallest} ({n} samples, train.batch_size "
            f"{batch_size}); change train.batch_size or the number of processes"
        )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the processes (``tensor`` itself in one process); no autograd."""
    if synced():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The rows of every process in rank order, [sum(sizes), ...] (no autograd): process r
    holds ``sizes[r]`` rows; the shares are padded to one size for the collective."""
    if not synced():
        return local
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _SumOverProcesses(torch.autograd.Function):
    """The sum over the processes; its gradient is the sum of every process's gradient
    (each process's loss depends on the sum, so each share feeds every loss)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce sum whose backward is the all-reduce sum of the gradients."""
    return _SumOverProcesses.apply(tensor)


# -- the model ----------------------------------------------------------------------------


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch normalisation over the global batch of all processes, on any device.

    In training under several processes the mean and (biased) variance normalising the
    batch, and the running statistics, are those of the whole global batch, computed in
    float64 from all-reduced sums (the gradient flows through them as through one
    process's batch norm); otherwise it is :class:`torch.nn.BatchNorm2d`. Same parameters,
    buffers and state-dict keys, so checkpoints do not tell the two apart.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and synced()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        wide = x.double()
        local = torch.cat([wide.sum(dims), wide.new_full((1,), x.numel() / x.shape[1])])
        total = _sum_with_grad(local)
        count = total[-1].detach()
        mean = total[:-1] / count
        var = _sum_with_grad((wide - mean.view(shape)).pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / (count - 1)) if count > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.to(x.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(x.dtype), alpha=factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.double()
        out = (wide - mean.view(shape)) * scale.view(shape)
        if self.affine:
            out = out + self.bias.double().view(shape)
        return out.to(x.dtype)


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Make every 2-d batch norm of ``model`` normalise over the global batch (in place:
    the same modules, parameters and buffers)."""
    for module in model.modules():
        # nn.BatchNorm2d and its single-process speed-ups (smoe.nn.batchnorm)
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
            module.__class__ = GlobalBatchNorm2d
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` under several
    processes (``model`` itself otherwise). Train through the wrapper; read and save the
    plain model (its state dict has no ``module.`` prefix)."""
    if not synced() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    global_batchnorm(model)
    # Buffers (batch-norm statistics) are equal on every process without broadcasting
    # them; the static graph handles parameters a model never uses (an attentive gate's
    # last layer) without searching the graph every step: which parameters take part
    # never changes during a training.
    options = {"forward_sync_buffers": False, "static_graph": True}
    if device.type == "cuda":
        options["device_ids"] = [device.index]
    return DistributedDataParallel(model, **options)
