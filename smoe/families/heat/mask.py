"""Region maps ("masks"): which region type, and so which diffusivity, each grid cell has.

The generator is the simple Markov-random-field-like sampler of the SMoE paper: cells are
visited in row-major order and each one leans towards the types of its already-assigned
neighbours. With ``seed=42``, 64 x 64 and 3 types it reproduces the paper's map bit for bit,
which is why the order of random draws below must not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smoe.core.atomic import atomic_file
from smoe.core.errors import InputError

MASK_SUFFIXES = (".npy", ".nc")


def generate_mask(height: int, width: int, types: int, seed: int) -> np.ndarray:
    """Draw a region map of shape (height, width) with values 0..types-1 (int64).

    Each cell starts from uniform probabilities 1/T; every assigned neighbour in its clipped
    3 x 3 window (up-left, up, up-right, left) of type t adds INC = (1 - 1/T) / 5 to p_t and
    takes INC / (T - 1) from every other type. One ``Generator.choice(T, p=p)`` per cell in
    row-major order consumes exactly one ``random()`` double, so the doubles are drawn up
    front and the choice (normalised cumulative sum, right-sided search) is replayed in plain
    Python: the same stream and the same arithmetic, a hundred times faster.
    """
    if height < 1 or width < 1:
        raise InputError(f"mask shape must be positive, got {height} x {width}")
    if types < 1:
        raise InputError(f"mask needs at least one region type, got types={types}")
    rng = np.random.default_rng(seed)
    uniforms = rng.random(height * width).tolist()
    inc = (1.0 - 1.0 / types) / 5.0
    start = float(np.float64(1.0) / types)
    grid = [[-1] * width for _ in range(height)]
    cell = 0
    for i in range(height):
        above = grid[i - 1] if i > 0 else None
        row = grid[i]
        for j in range(width):
            counts = [0] * types
            if above is not None:
                for jj in range(max(j - 1, 0), min(j + 2, width)):
                    counts[above[jj]] += 1
            if j > 0:
                counts[row[j - 1]] += 1
            p = [start] * types
            for t in range(types):
                c = counts[t]
                if c:
                    for s in range(types):
                        if s == t:
                            p[s] += c * inc
                        else:
                            p[s] -= c * inc / (types - 1)
            row[j] = _choose(p, uniforms[cell])
            cell += 1
    return np.asarray(grid, dtype=np.int64)


def _choose(p: list[float], u: float) -> int:
    """Index picked by ``Generator.choice(len(p), p=p)`` for the uniform double ``u``."""
    cdf = []
    total = 0.0
    for value in p:
        total += value
        cdf.append(total)
    last = cdf[-1]
    index = 0
    for value in cdf:
        if value / last <= u:
            index += 1
        else:
            break
    return index


def check_mask(mask: np.ndarray, types: int, source: str) -> np.ndarray:
    """Return ``mask`` as int64 after checking it is a usable map of ``types`` region types.

    Every type must occur at least once: the simulation places heat sources in each type.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputError(f"{source}: a region map must be 2-D, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{source}: the region map is empty")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{source}: region map values must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"{source}: region map values must be whole numbers")
    arr = arr.astype(np.int64)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > types - 1:
        bad = sorted(set(np.unique(arr).tolist()) - set(range(types)))
        raise InputError(
            f"{source}: region map has values {bad[:10]} outside 0..{types - 1} "
            f"(types={types}, one diffusivity per type)"
        )
    missing = sorted(set(range(types)) - set(np.unique(arr).tolist()))
    if missing:
        raise InputError(
            f"{source}: region types {missing} never occur in the map; every one of the "
            f"{types} types needs at least one cell"
        )
    return arr


def load_mask(path: str | Path) -> np.ndarray:
    """Read a region map from ``.npy`` or netCDF (variable ``mask``, or the only 2-D one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mask file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(
                f"mask file {str(path)!r} is not a readable .npy array: {exc}"
            ) from exc
    if path.suffix == ".nc":
        import xarray as xr

        try:
            with xr.open_dataset(path) as ds:
                if "mask" in ds:
                    return ds["mask"].values
                candidates = [name for name, var in ds.data_vars.items() if var.ndim == 2]
                if len(candidates) != 1:
                    raise InputError(
                        f"mask file {str(path)!r} has no variable 'mask' and "
                        f"{len(candidates)} 2-D variables; name the map 'mask'"
                    )
                return ds[candidates[0]].values
        except (ValueError, OSError) as exc:
            raise InputError(f"mask file {str(path)!r} is not readable netCDF: {exc}") from exc
    raise InputError(f"mask file {str(path)!r}: unknown format, expected one of {MASK_SUFFIXES}")


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    """Write a map as ``.npy`` or netCDF, atomically: a reader never sees half a file."""
    path = Path(path)
    if path.suffix not in MASK_SUFFIXES:
        raise InputError(f"mask output {str(path)!r}: expected a name ending in {MASK_SUFFIXES}")
    with atomic_file(path) as partial:
        if path.suffix == ".npy":
            with open(partial, "wb") as handle:
                np.save(handle, np.asarray(mask, dtype=np.int64))
        else:
            mask_dataset(mask).to_netcdf(partial, engine="netcdf4", format="NETCDF4")


def mask_dataset(mask: np.ndarray):
    """The map as an xarray Dataset with CF flag attributes, as stored beside simulations."""
    import xarray as xr

    types = int(mask.max()) + 1
    da = xr.DataArray(
        np.asarray(mask, dtype=np.int8),
        dims=("y", "x"),
        attrs={
            "long_name": "region type of each grid cell",
            "flag_values": np.arange(types, dtype=np.int8),
            "flag_meanings": " ".join(f"region_{t}" for t in range(types)),
        },
    )
    return xr.Dataset({"mask": da}, attrs={"Conventions": "CF-1.10"})


def plot_mask(mask: np.ndarray, path: str | Path, title: str = "region map") -> None:
    """Save a picture of the map, one discrete colour per region type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    types = int(mask.max()) + 1
    colours = plt.get_cmap("viridis", types)(np.arange(types))
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-0.5, types + 0.5), types)
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=120)
    image = ax.imshow(mask, cmap=cmap, norm=norm, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, ticks=np.arange(types))
    bar.set_label("region type")
    counts = np.bincount(np.asarray(mask).ravel(), minlength=types)
    ax.set_title(
        f"{title}\n{mask.shape[0]}x{mask.shape[1]}, cells per type {counts.tolist()}", fontsize=8
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    fig.tight_layout()
    with atomic_file(Path(path)) as partial:
        fig.savefig(partial, format="png")
    plt.close(fig)
