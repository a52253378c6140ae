"""Synthetic-cluster data of Chen et al. (NeurIPS 2022), pure numpy, no I/O.

"Towards Understanding Mixture of Experts in Deep Learning" (arXiv 2208.02813) trains a
mixture of small CNN experts on inputs made of ``P`` patches of dimension ``d``. Each sample
has a label ``y`` in {-1, +1} and a cluster ``k`` in 0..K-1, both uniform and independent,
and its patches are

- feature signal: ``y * alpha * v_k`` with ``alpha ~ U[alpha_low, alpha_high]``;
- cluster centre: ``beta * c_k`` with ``beta ~ U[beta_low, beta_high]``;
- feature noise: ``eps * gamma * v_k'`` with ``k'`` uniform among the K - 1 clusters other
  than ``k``, ``eps`` a uniform random sign and ``gamma ~ U[gamma_low, gamma_high]``;
- Gaussian noise: every remaining patch (one when P = 4) is ``N(0, sigma_p^2 / d * I)``,
  i.e. per-coordinate standard deviation ``sigma_p / sqrt(d)``.

``v_1..v_K`` (label signals) and ``c_1..c_K`` (cluster centres) are 2K mutually orthonormal
vectors of R^d. The patch order is permuted at random per sample, the whole input is then
multiplied by ``scale`` and stored as float32, and labels are mapped to {0, 1} (y = -1 -> 0).
The paper's general definition has "the rest P - 3 patches" Gaussian; the four settings it
reports use P = 4, so here P must be at least 4 (every kind present) and extra patches are
further Gaussian-noise patches.

Seeding. One integer seed defines a data set. Three independent streams are derived from it
with ``numpy.random.SeedSequence(seed).spawn(3)``, in the order of :data:`STREAMS`:
``vectors`` (the orthonormal vectors, shared by both splits, so the test set comes from the
same distribution as the train set), ``train`` and ``test``. Each stream is a
``numpy.random.default_rng`` over PCG64. Within a split, :func:`sample` draws whole arrays in
a fixed order (y, k, alpha, beta, gamma, the offset of k', eps, the Gaussian patches, the
patch permutation); every draw consumes the same random numbers whatever the setting's
values, so two settings with the same seed share everything but what they change (s2's
noise patches are exactly twice s1's, s3's gamma is s1's mapped onto its own range). The
sample count is part of the data set: a different ``n`` gives different samples throughout.
One seed gives bit-identical arrays on one machine; the vectors come from LAPACK's QR, so
another BLAS/LAPACK build may change their last bits (and, rarely, the last bit of an input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from smoe.core.errors import InputError

STREAMS = ("vectors", "train", "test")
"""Random streams spawned from a data set's seed, in spawn order."""

SPLITS = ("train", "test")
"""Splits that are generated; a validation split is carved from train by the trainer."""

PATCH_KINDS = ("feature_signal", "cluster_centre", "feature_noise", "gaussian_noise")
"""Patch kinds, coded 0..3 in :attr:`ClusterSample.patch_kind`."""

FEATURE_SIGNAL, CLUSTER_CENTRE, FEATURE_NOISE, GAUSSIAN_NOISE = range(4)
MIN_PATCHES = len(PATCH_KINDS)


@dataclass(frozen=True)
class ClusterSetting:
    """Everything that defines a synthetic-cluster data set except its seed."""

    name: str = "s1"
    n_train: int = 16000
    n_test: int = 16000
    clusters: int = 4
    patches: int = 4
    dim: int = 50
    alpha: tuple[float, float] = (0.5, 2.0)
    beta: tuple[float, float] = (1.0, 2.0)
    gamma: tuple[float, float] = (0.5, 3.0)
    sigma_p: float = 1.0
    scale: float = 10.0

    def samples(self, split: str) -> int:
        """The number of samples of a split (``train`` or ``test``)."""
        check_split(split)
        return self.n_train if split == "train" else self.n_test

    def validate(self, key: str = "clusters.data") -> ClusterSetting:
        """Reject values that cannot define a data set; the message names ``key.<field>``."""
        if self.name not in SETTINGS:
            raise InputError(
                f"{key}.setting: {self.name!r} is not a known setting; known: {', '.join(SETTINGS)}"
            )
        for field in ("n_train", "n_test", "clusters", "patches", "dim"):
            value = getattr(self, field)
            if not _is_int(value):
                raise InputError(f"{key}.{field}: must be an integer, got {value!r}")
        for field in ("n_train", "n_test"):
            if getattr(self, field) < 1:
                raise InputError(f"{key}.{field}: must be at least 1, got {getattr(self, field)}")
        if self.clusters < 2:
            raise InputError(
                f"{key}.clusters: must be at least 2 (the feature-noise patch uses another "
                f"cluster's signal), got {self.clusters}"
            )
        if self.patches < MIN_PATCHES:
            raise InputError(
                f"{key}.patches: must be at least {MIN_PATCHES} (feature signal, cluster "
                f"centre, feature noise and at least one Gaussian-noise patch), got "
                f"{self.patches}"
            )
        if self.dim < 1:
            raise InputError(f"{key}.dim: must be at least 1, got {self.dim}")
        if 2 * self.clusters > self.dim:
            raise InputError(
                f"{key}.dim: {self.dim} dimensions cannot hold 2 x {self.clusters} "
                "orthonormal vectors (a label signal and a centre per cluster)"
            )
        for field, positive in (("alpha", True), ("beta", False), ("gamma", False)):
            _check_range(f"{key}.{field}", getattr(self, field), positive)
        for field, low_ok in (("sigma_p", True), ("scale", False)):
            value = getattr(self, field)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise InputError(f"{key}.{field}: must be a finite number >= 0, got {value!r}")
            if value == 0 and not low_ok:
                raise InputError(f"{key}.{field}: must be > 0, got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (ranges as two-element lists)."""
        record = asdict(self)
        for field in ("alpha", "beta", "gamma"):
            record[field] = [float(v) for v in record[field]]
        for field in ("sigma_p", "scale"):
            record[field] = float(record[field])
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ClusterSetting:
        """The inverse of :meth:`to_dict` (no validation; call :meth:`validate`)."""
        values = dict(record)
        for field in ("alpha", "beta", "gamma"):
            if field in values and isinstance(values[field], list | tuple):
                values[field] = tuple(values[field])
        return cls(**values)


SETTINGS: dict[str, ClusterSetting] = {
    "s1": ClusterSetting("s1"),
    "s2": ClusterSetting("s2", sigma_p=2.0),
    "s3": ClusterSetting("s3", gamma=(0.5, 2.0)),
    "s4": ClusterSetting("s4", sigma_p=2.0, gamma=(0.5, 2.0)),
}
"""The paper's four settings at the paper's sizes (16,000 train and 16,000 test samples)."""

SETTING_KEYS = ("setting",) + tuple(f for f in ClusterSetting.__dataclass_fields__ if f != "name")
"""Keys a config's data section may hold: the setting's name and any field to override."""


def make_setting(
    config: Mapping[str, Any] | None = None, key: str = "clusters.data"
) -> ClusterSetting:
    """A validated setting from a config section, e.g. ``{"setting": "s1", "n_train": 2000}``.

    ``setting`` (default ``s1``) picks one of :data:`SETTINGS`; every other key overrides
    that field. Ranges are given as two numbers ``[low, high]``. Errors name ``key.<field>``.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(SETTING_KEYS), key=str)
    if unknown:
        raise InputError(f"{key}.{unknown[0]}: not a setting key; known: {', '.join(SETTING_KEYS)}")
    name = config.pop("setting", "s1")
    if name not in SETTINGS:
        raise InputError(
            f"{key}.setting: {name!r} is not a known setting; known: {', '.join(SETTINGS)}"
        )
    overrides = {}
    for field, value in config.items():
        if field in ("alpha", "beta", "gamma"):
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise InputError(
                    f"{key}.{field}: must be a range of two numbers [low, high], got {value!r}"
                )
            value = tuple(value)
        overrides[field] = value
    return replace(SETTINGS[name], **overrides).validate(key)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_range(key: str, pair: Any, positive: bool) -> None:
    if not isinstance(pair, tuple) or len(pair) != 2 or not all(_is_number(v) for v in pair):
        raise InputError(f"{key}: must be a range of two numbers [low, high], got {pair!r}")
    low, high = pair
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"{key}: [{low}, {high}] is not finite")
    if low > high:
        raise InputError(f"{key}: [{low}, {high}] needs low <= high")
    if positive and low <= 0:
        raise InputError(f"{key}: [{low}, {high}] needs low > 0 (the label's sign must show)")
    if low < 0:
        raise InputError(f"{key}: [{low}, {high}] needs low >= 0")


def stream(seed: int, name: str) -> np.random.Generator:
    """The random stream ``name`` (one of :data:`STREAMS`) of a data set's seed.

    Equal to ``default_rng(SeedSequence(seed).spawn(3)[STREAMS.index(name)])``.
    """
    if not _is_int(seed) or seed < 0:
        raise InputError(f"seed: must be an integer >= 0, got {seed!r}")
    if name not in STREAMS:
        raise InputError(f"random stream {name!r} is not one of {', '.join(STREAMS)}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(STREAMS.index(name),))
    return np.random.default_rng(sequence)


def orthonormal_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """``count`` mutually orthonormal vectors of R^dim as the rows of a float64 array.

    The Q factor of a Gaussian ``dim x count`` matrix, its columns' signs fixed by R's
    diagonal so the vectors are uniformly distributed (Haar) rather than QR-convention biased.
    """
    if count > dim:
        raise InputError(f"{dim} dimensions cannot hold {count} orthonormal vectors")
    gaussian = rng.standard_normal((dim, count))
    q, r = np.linalg.qr(gaussian)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return np.ascontiguousarray((q * signs).T)


@dataclass(frozen=True, eq=False)
class ClusterVectors:
    """The generating vectors: ``signal[k]`` is v_k, ``centre[k]`` is c_k; (K, d) float64."""

    signal: np.ndarray
    centre: np.ndarray


def cluster_vectors(setting: ClusterSetting, rng: np.random.Generator) -> ClusterVectors:
    """The 2K orthonormal vectors of a setting: the first K are signals, the rest centres."""
    rows = orthonormal_vectors(rng, 2 * setting.clusters, setting.dim)
    return ClusterVectors(rows[: setting.clusters].copy(), rows[setting.clusters :].copy())


def vectors_for_seed(setting: ClusterSetting, seed: int) -> ClusterVectors:
    """The vectors a seed gives (its ``vectors`` stream), shared by both splits."""
    return cluster_vectors(setting, stream(seed, "vectors"))


@dataclass(frozen=True, eq=False)
class ClusterSample:
    """Samples and how each was made; arrays over ``n`` samples.

    ``x`` (n, P, d) float32, already multiplied by ``scale``; ``label`` int64 in {0, 1}
    (y = 2 label - 1); ``cluster`` int64 k; ``patch_kind`` (n, P) int8 coded as
    :data:`PATCH_KINDS`; ``alpha``, ``beta``, ``gamma`` float64 (before ``scale``);
    ``noise_cluster`` int64 k' of the feature-noise patch; ``noise_sign`` int8 eps.
    """

    x: np.ndarray
    label: np.ndarray
    cluster: np.ndarray
    patch_kind: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    noise_cluster: np.ndarray
    noise_sign: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


def sample(
    setting: ClusterSetting, vectors: ClusterVectors, n: int, rng: np.random.Generator
) -> ClusterSample:
    """Draw ``n`` samples of ``setting`` from ``rng`` with the given generating vectors."""
    if not _is_int(n) or n < 1:
        raise InputError(f"sample count must be an integer >= 1, got {n!r}")
    clusters, patches, dim = setting.clusters, setting.patches, setting.dim
    if vectors.signal.shape != (clusters, dim) or vectors.centre.shape != (clusters, dim):
        raise InputError(
            f"vectors of shape {vectors.signal.shape} and {vectors.centre.shape} do not fit "
            f"{clusters} clusters of dimension {dim}"
        )
    y = 2 * rng.integers(0, 2, n) - 1
    k = rng.integers(0, clusters, n)
    alpha = rng.uniform(*setting.alpha, n)
    beta = rng.uniform(*setting.beta, n)
    gamma = rng.uniform(*setting.gamma, n)
    noise_cluster = (k + rng.integers(1, clusters, n)) % clusters
    eps = 2 * rng.integers(0, 2, n) - 1
    gaussian = rng.normal(0.0, setting.sigma_p / math.sqrt(dim), (n, patches - 3, dim))
    base = np.array(
        [FEATURE_SIGNAL, CLUSTER_CENTRE, FEATURE_NOISE] + [GAUSSIAN_NOISE] * (patches - 3),
        dtype=np.int8,
    )
    patch_kind = rng.permuted(np.tile(base, (n, 1)), axis=1)

    x = np.empty((n, patches, dim), dtype=np.float64)
    rows = np.arange(n)
    x[rows, np.argmax(patch_kind == FEATURE_SIGNAL, axis=1)] = (y * alpha)[:, None] * (
        vectors.signal[k]
    )
    x[rows, np.argmax(patch_kind == CLUSTER_CENTRE, axis=1)] = beta[:, None] * vectors.centre[k]
    x[rows, np.argmax(patch_kind == FEATURE_NOISE, axis=1)] = (eps * gamma)[:, None] * (
        vectors.signal[noise_cluster]
    )
    # Row-major nonzero: each sample's noise positions in order, n * (P - 3) of them.
    noise_rows, noise_cols = np.nonzero(patch_kind == GAUSSIAN_NOISE)
    x[noise_rows, noise_cols] = gaussian.reshape(-1, dim)
    x *= setting.scale
    return ClusterSample(
        x=x.astype(np.float32),
        label=((y + 1) // 2).astype(np.int64),
        cluster=k.astype(np.int64),
        patch_kind=patch_kind,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        noise_cluster=noise_cluster.astype(np.int64),
        noise_sign=eps.astype(np.int8),
    )


def generate_split(
    setting: ClusterSetting, seed: int, split: str
) -> tuple[ClusterVectors, ClusterSample]:
    """The vectors and the samples of one split of a seed, as the stores hold them."""
    setting.validate()
    vectors = vectors_for_seed(setting, seed)
    return vectors, sample(setting, vectors, setting.samples(split), stream(seed, split))
