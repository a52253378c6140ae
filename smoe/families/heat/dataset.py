"""PyTorch view of a heat store: (frame t, frame t+1) pairs of one run, normalised.

A sample's input is the current frame, then ``context`` previous frames newest to oldest,
then (optionally) the region map; its target is the next frame. Small stores are loaded
into one float32 tensor and batched with tensor indexing, which is far faster than a
DataLoader on a few-KiB samples. Larger stores are read on demand from zarr, and then worker
processes must never inherit a zarr handle: zarr 3 does its I/O on a background event-loop
thread, and a forked child gets the loop without the thread (recent zarr resets it at fork,
early 3.x releases hang; forking a threaded process is unsafe either way). So the dataset
pickles only its path, reopens the array once per process and asks for ``forkserver`` or
``spawn`` workers, which need the usual ``if __name__ == "__main__":`` guard in scripts.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)

from smoe.core.errors import InputError, one_line
from smoe.core.provenance import store_inconsistencies, store_provenance
from smoe.families.heat.store import (
    chunk_key,
    chunk_read_error,
    field_reads,
    open_store,
    regenerate_hint,
)

NORMALIZER_KINDS = ("none", "zscore", "minmax")
DEFAULT_MAX_EAGER_BYTES = 4 * 2**30
MAX_CACHED_CHUNK_BYTES = 64 * 2**20
"""Lazy reads keep the last decoded chunk up to this size: zarr decodes whole chunks anyway,
so consecutive samples of the same runs (unshuffled evaluation) then cost one decode."""

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Normalizer:
    """An affine map ``(a - offset) / scale`` fitted on the train split and reused verbatim.

    Validation and test data must be scaled with the train statistics, and a checkpoint must
    carry them so predictions can be mapped back; hence a tiny, JSON-safe value object.
    """

    kind: str = "none"
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZER_KINDS:
            raise InputError(f"normalizer kind {self.kind!r} is not one of {NORMALIZER_KINDS}")
        if not math.isfinite(self.offset):
            raise InputError(f"normalizer offset must be finite, got {self.offset}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise InputError(f"normalizer scale must be finite and non-zero, got {self.scale}")

    @classmethod
    def fit(cls, store_path: str | Path, kind: str) -> Normalizer:
        """Statistics of the whole field ``u``, reduced chunk by chunk with dask.

        A train split can be larger than memory, so it is never loaded at once; sums are
        accumulated in float64 so millions of float32 values do not lose precision.
        """
        if kind not in NORMALIZER_KINDS:
            raise InputError(f"normalizer kind {kind!r} is not one of {NORMALIZER_KINDS}")
        if kind == "none":
            return cls("none")
        import dask

        field = open_store(store_path)["u"].data
        with field_reads(store_path):
            if kind == "zscore":
                stats = dask.compute(field.mean(dtype=np.float64), field.std(dtype=np.float64))
            else:
                stats = dask.compute(field.min(), field.max())
        if kind == "zscore":
            offset, spread = stats
            offset, scale = float(offset), float(spread)
        else:
            low, high = (np.float32(v) for v in stats)
            # The difference in float32, as normalize computes a - low: max maps to exactly 1.
            offset, scale = float(low), float(high - low)
        if not (math.isfinite(offset) and math.isfinite(scale)):
            raise InputError(
                f"store {str(store_path)!r}: field u has non-finite values, cannot fit a "
                f"{kind} normalizer"
            )
        # A constant field has no spread; shifting it alone keeps the map invertible.
        return cls(kind, offset, scale if scale > 0 else 1.0)

    def normalize(self, a: Any) -> Any:
        """Map a tensor or array into model units (dtype is kept)."""
        return (a - self.offset) / self.scale

    def denormalize(self, a: Any) -> Any:
        """Map model outputs back into field units."""
        return a * self.scale + self.offset

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": float(self.offset), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        """Rebuild from :meth:`to_dict`, rejecting checkpoints that lost or renamed a key."""
        expected = {"kind", "offset", "scale"}
        if not isinstance(data, dict) or set(data) != expected:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise InputError(f"normalizer needs exactly the keys {sorted(expected)}, got {keys}")
        return cls(str(data["kind"]), float(data["offset"]), float(data["scale"]))


def worker_context() -> str:
    """Start method for DataLoader workers: never ``fork`` a process that has used zarr.

    A forked child inherits zarr 3's event loop but not the thread that runs it;
    ``forkserver`` forks from a clean server process instead (cheap on Linux), ``spawn``
    elsewhere (``fork`` is unavailable or unsafe there).
    """
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


class HeatPairs(Dataset):
    """Consecutive-frame pairs of every run of one store, indexed run-major."""

    def __init__(
        self,
        store: str | Path,
        context: int = 0,
        mask_channel: bool = False,
        normalizer: Normalizer | None = None,
        eager: bool | None = None,
        max_eager_bytes: int = DEFAULT_MAX_EAGER_BYTES,
    ) -> None:
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise InputError(f"context must be a non-negative integer, got {context!r}")
        self._path = Path(store)
        self._context = context
        self._mask_channel = bool(mask_channel)
        self._normalizer = normalizer or Normalizer()
        ds = open_store(self._path)
        self._runs, self._frames, self._height, self._width = (int(n) for n in ds["u"].shape)
        self._check_shape()
        mask, diffusivity = self._read_small(ds, "mask"), self._read_small(ds, "diffusivity")
        self._mask = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        self._diffusivity = tuple(float(a) for a in diffusivity)
        problems = store_inconsistencies(ds)
        if problems:
            raise InputError(
                f"store {str(self._path)!r} cannot be used: {'; '.join(problems)}. It was "
                f"changed after it was written: regenerate it (remove it and rerun snakemake, "
                f"or smoe simulate)"
            )
        self._provenance = store_provenance(ds)
        self._boundary = str(ds.attrs.get("boundary", "zero"))
        types = max(len(self._diffusivity), int(self._mask.max()) + 1)
        self._mask_plane = (self._mask.float() / max(types - 1, 1)).unsqueeze(0)
        field_bytes = self._runs * self._frames * self._height * self._width * 4
        self._eager = field_bytes < max_eager_bytes if eager is None else bool(eager)
        self._reset_handles()
        self._field = self._load_field() if self._eager else None

    def _read_small(self, ds: Any, name: str) -> np.ndarray:
        """A small variable's values, or an InputError naming the store and the variable."""
        try:
            return ds[name].values
        except Exception as exc:  # noqa: BLE001 - any decoder's error means damaged data
            raise InputError(
                f"store {str(self._path)!r}: array {name!r} cannot be read "
                f"({type(exc).__name__}: {one_line(exc)}); {regenerate_hint(self._path)}"
            ) from exc

    def _read_chunk(self, array: Any, first: int, index: Any) -> np.ndarray:
        """``array[index]``, reading the field's chunk that holds run ``first``; a chunk zarr
        cannot read or decode (truncated, damaged, gone) raises an InputError naming it."""
        try:
            return array[index]
        except Exception as exc:  # noqa: BLE001 - zarr and the codecs raise many types
            raise chunk_read_error(self._path, chunk_key(array, first), exc) from exc

    def _check_shape(self) -> None:
        if self._runs < 1:
            raise InputError(f"store {str(self._path)!r} has no runs")
        if self._frames < self._context + 2:
            raise InputError(
                f"store {str(self._path)!r} has {self._frames} frames per run; context "
                f"{self._context} needs at least {self._context + 2}"
            )

    def _reset_handles(self) -> None:
        """Forget per-process zarr state (after unpickling, or before first use)."""
        self._array: Any = None
        self._array_pid: int | None = None
        self._chunk: np.ndarray | None = None
        self._chunk_first = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_array", "_array_pid", "_chunk", "_chunk_first"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def _zarr_array(self) -> Any:
        """This process's handle on ``u``; a handle from another process is never reused."""
        if self._array is None or self._array_pid != os.getpid():
            import zarr

            self._reset_handles()
            self._array = zarr.open_array(self._path / "u", mode="r")
            self._array_pid = os.getpid()
        return self._array

    def _load_field(self) -> torch.Tensor:
        """The whole field as one normalised float32 tensor, read one stored chunk at a time.

        Reading by chunks keeps the peak at the field plus one chunk, and lets every run be
        checked for NaN/Inf before a model ever sees it: every value a batch can hold is
        finite, so training need not check its batches (a pass over each, every step).
        """
        array = self._zarr_array()
        field = torch.empty((self._runs, self._frames, self._height, self._width))
        step = int(array.chunks[0])
        bad: dict[int, int] = {}
        for first in range(0, self._runs, step):
            block = np.asarray(
                self._read_chunk(array, first, slice(first, first + step)), dtype=np.float32
            )
            normalized = self._normalizer.normalize(torch.from_numpy(block))
            # counted after scaling: a stored NaN/Inf stays one, and an overflow shows too
            counts = (~torch.isfinite(normalized)).sum(dim=(1, 2, 3)).numpy()
            bad.update({first + int(r): int(counts[r]) for r in np.flatnonzero(counts)})
            field[first : first + len(block)] = normalized
        self._reset_handles()
        if bad:
            raise InputError(self._non_finite_message(bad))
        return field

    def _non_finite_message(self, bad: dict[int, int]) -> str:
        runs = ", ".join(f"run {run}: {count}" for run, count in list(bad.items())[:10])
        more = f" and {len(bad) - 10} more runs" if len(bad) > 10 else ""
        total = sum(bad.values())
        return (
            f"store {str(self._path)!r}: field u has {total} non-finite value(s) (NaN/Inf) "
            f"({runs}{more}); regenerate the split"
        )

    @staticmethod
    def worker_context() -> str:
        """The multiprocessing start method trainers must use for this dataset's workers."""
        return worker_context()

    @property
    def store_path(self) -> Path:
        return self._path

    @property
    def eager(self) -> bool:
        return self._eager

    @property
    def context(self) -> int:
        return self._context

    @property
    def normalizer(self) -> Normalizer:
        return self._normalizer

    @property
    def in_channels(self) -> int:
        return 1 + self._context + int(self._mask_channel)

    @property
    def provenance(self) -> dict[str, Any]:
        """How the store was made (:func:`smoe.core.provenance.store_provenance`)."""
        return self._provenance

    @property
    def boundary(self) -> str:
        """The simulation's boundary condition (``zero`` or ``wrap``)."""
        return self._boundary

    @property
    def mask(self) -> torch.Tensor:
        return self._mask.clone()

    @property
    def diffusivity(self) -> tuple[float, ...]:
        return self._diffusivity

    @property
    def height(self) -> int:
        return self._height

    @property
    def width(self) -> int:
        return self._width

    @property
    def runs(self) -> int:
        return self._runs

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def pairs_per_run(self) -> int:
        return self._frames - 1 - self._context

    def __len__(self) -> int:
        return self._runs * self.pairs_per_run

    def pair_index(self, i: int) -> tuple[int, int]:
        """(run, t) of sample ``i``: its input ends at frame t, its target is frame t+1."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} pairs")
        run, offset = divmod(i % n, self.pairs_per_run)
        return run, offset + self._context

    def __getitem__(self, i: int) -> Batch:
        run, t = self.pair_index(int(i))
        window = self._window(run, t - self._context, t + 2)  # frames t-c .. t+1, oldest first
        x = window[: self._context + 1].flip(0)
        if self._mask_channel:
            x = torch.cat([x, self._mask_plane])
        return x, window[self._context + 1 :].clone()

    def _window(self, run: int, start: int, stop: int) -> torch.Tensor:
        if self._field is not None:
            return self._field[run, start:stop]
        frames = np.asarray(self._read_frames(run, start, stop), dtype=np.float32)
        window = self._normalizer.normalize(torch.from_numpy(frames))
        if not torch.isfinite(window).all():  # after scaling, as the eager check
            count = int((~torch.isfinite(window)).sum())
            raise InputError(
                f"store {str(self._path)!r}: field u has {count} non-finite value(s) (NaN/Inf) "
                f"in run {run}, frames {start}..{stop - 1}"
            )
        return window

    def _read_frames(self, run: int, start: int, stop: int) -> np.ndarray:
        """Frames of one run from zarr, through a one-chunk cache when chunks are small."""
        array = self._zarr_array()
        step = int(array.chunks[0])
        chunk_bytes = step * int(np.prod(array.chunks[1:])) * array.dtype.itemsize
        if chunk_bytes > MAX_CACHED_CHUNK_BYTES:
            return self._read_chunk(array, run, (run, slice(start, stop)))
        first = run - run % step
        if self._chunk is None or self._chunk_first != first:
            self._chunk = self._read_chunk(array, first, slice(first, first + step))
            self._chunk_first = first
        return self._chunk[run - first, start:stop]

    def batches(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        part: tuple[int, int] | None = None,
    ) -> Iterator[Batch]:
        """Batches [B, C, H, W], [B, 1, H, W] without a DataLoader.

        The order is drawn now, with one ``torch.randperm`` on ``generator``, so restoring
        the generator's state from before this call replays the same epoch (for resuming).
        Eager batches are gathered with one indexing operation each: per-sample Python and
        collation would dominate the cost of a small model. With ``part`` (rank, processes)
        each batch is only that process's share of it (:func:`share_of`), the order drawn as
        without.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        batches = (order[s : s + batch_size] for s in range(0, stop, batch_size))
        if part is not None:
            batches = (share_of(indices, part) for indices in batches)
        if self._field is None:
            return (self._stack(indices) for indices in batches)
        return (self._gather(indices) for indices in batches)

    def _gather(self, indices: torch.Tensor) -> Batch:
        """Frames picked as rows of the field seen as [runs * frames, H, W]: one
        ``index_select`` (a copy of whole frames) is twice as fast as indexing by (run, t)."""
        frames = self._field.view(-1, self._height, self._width)
        runs = indices // self.pairs_per_run
        t = indices % self.pairs_per_run + self._context
        rows = runs * self._frames + t
        inputs = (rows[:, None] - torch.arange(self._context + 1)).flatten()  # t, ..., t-c
        x = frames.index_select(0, inputs).view(len(indices), -1, self._height, self._width)
        if self._mask_channel:
            x = torch.cat([x, self._mask_plane.expand(len(indices), 1, -1, -1)], dim=1)
        return x, frames.index_select(0, rows + 1).unsqueeze(1)

    def _stack(self, indices: torch.Tensor) -> Batch:
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def share_of(indices: Any, part: tuple[int, int]) -> Any:
    """Process ``rank``'s contiguous share of a batch's ``indices`` (``part`` = rank,
    processes): shares in rank order, the first ``len % processes`` one larger."""
    rank, size = part
    base, extra = divmod(len(indices), size)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (rank < extra)]


class _SharedBatches:
    """A batch sampler yielding one process's share of every batch of ``batches``."""

    def __init__(self, batches: BatchSampler, part: tuple[int, int]) -> None:
        self.batches, self.part = batches, part

    def __iter__(self) -> Iterator[list[int]]:
        return (share_of(indices, self.part) for indices in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(
    dataset: HeatPairs,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    workers: int = 0,
    part: tuple[int, int] | None = None,
) -> Iterable[Batch]:
    """The batches for one epoch: in-process when possible, DataLoader workers otherwise.

    Workers only pay off when samples come from disk; an eager dataset is already in memory
    and would only be copied into each worker. With ``part`` (rank, processes) each batch
    is that process's share of the batch one process would get (multi-process training);
    ``generator`` is drawn from exactly as without.
    """
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    if dataset.eager or workers == 0:
        return dataset.batches(batch_size, shuffle, generator, part=part)
    if part is not None:  # the sampler DataLoader(shuffle=True) builds, batches shared out
        sampler = RandomSampler(dataset, generator=generator) if shuffle else None
        sampler = sampler or SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_sampler=_SharedBatches(BatchSampler(sampler, batch_size, False), part),
            generator=generator,
            num_workers=workers,
            multiprocessing_context=dataset.worker_context(),
            persistent_workers=False,
            pin_memory=False,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        multiprocessing_context=dataset.worker_context(),
        persistent_workers=False,
        pin_memory=False,
    )
