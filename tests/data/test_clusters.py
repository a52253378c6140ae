import math
from dataclasses import replace

import numpy as np
import pytest

from smoe.core.errors import InputError
from smoe.families.clusters.data import (
    CLUSTER_CENTRE,
    FEATURE_NOISE,
    FEATURE_SIGNAL,
    GAUSSIAN_NOISE,
    SETTINGS,
    ClusterSetting,
    generate_split,
    make_setting,
    orthonormal_vectors,
    sample,
    stream,
    vectors_for_seed,
)

S1 = SETTINGS["s1"]
N = 4000  # samples per statistical test: 5-sigma bounds below stay well inside 5 %


@pytest.fixture(scope="module")
def drawn():
    vectors = vectors_for_seed(S1, 7)
    return vectors, sample(S1, vectors, N, stream(7, "train"))


def test_settings_match_the_paper():
    assert S1 == ClusterSetting(
        "s1", 16000, 16000, 4, 4, 50, (0.5, 2.0), (1.0, 2.0), (0.5, 3.0), 1.0, 10.0
    )
    assert SETTINGS["s2"] == replace(S1, name="s2", sigma_p=2.0)
    assert SETTINGS["s3"] == replace(S1, name="s3", gamma=(0.5, 2.0))
    assert SETTINGS["s4"] == replace(S1, name="s4", sigma_p=2.0, gamma=(0.5, 2.0))
    for setting in SETTINGS.values():
        setting.validate()


def test_orthonormal_vectors():
    rows = orthonormal_vectors(np.random.default_rng(0), 8, 50)
    assert rows.shape == (8, 50) and rows.dtype == np.float64
    np.testing.assert_allclose(rows @ rows.T, np.eye(8), atol=1e-6)
    vectors = vectors_for_seed(S1, 3)
    both = np.vstack([vectors.signal, vectors.centre])
    assert vectors.signal.shape == vectors.centre.shape == (4, 50)
    np.testing.assert_allclose(both @ both.T, np.eye(8), atol=1e-6)
    # The full 50 x 50 case is still orthonormal.
    square = orthonormal_vectors(np.random.default_rng(1), 50, 50)
    np.testing.assert_allclose(square @ square.T, np.eye(50), atol=1e-6)


def test_arrays_shapes_and_types(drawn):
    _, s = drawn
    assert len(s) == N
    assert s.x.shape == (N, 4, 50) and s.x.dtype == np.float32
    assert s.label.dtype == np.int64 and set(np.unique(s.label)) == {0, 1}
    assert s.cluster.dtype == np.int64 and set(np.unique(s.cluster)) == {0, 1, 2, 3}
    assert s.patch_kind.shape == (N, 4) and s.patch_kind.dtype == np.int8
    # One patch of each kind per sample.
    np.testing.assert_array_equal(np.sort(s.patch_kind, axis=1), np.tile([0, 1, 2, 3], (N, 1)))


def _patch(s, kind):
    """The patch of ``kind`` of every sample, unscaled, float64."""
    position = np.argmax(s.patch_kind == kind, axis=1)
    return s.x[np.arange(len(s)), position].astype(np.float64) / S1.scale


def test_each_patch_is_what_the_paper_says(drawn):
    vectors, s = drawn
    y = 2 * s.label - 1
    rows = np.arange(N)
    feature = _patch(s, FEATURE_SIGNAL)
    centre = _patch(s, CLUSTER_CENTRE)
    noise = _patch(s, FEATURE_NOISE)
    np.testing.assert_allclose(
        feature, (y * s.alpha)[:, None] * vectors.signal[s.cluster], atol=1e-6
    )
    np.testing.assert_allclose(centre, s.beta[:, None] * vectors.centre[s.cluster], atol=1e-6)
    expected = (s.noise_sign * s.gamma)[:, None] * vectors.signal[s.noise_cluster]
    np.testing.assert_allclose(noise, expected, atol=1e-6)

    # Recover y and k from the feature patch alone by projecting on the signals.
    on_signals = feature @ vectors.signal.T
    k = np.argmax(np.abs(on_signals), axis=1)
    np.testing.assert_array_equal(k, s.cluster)
    np.testing.assert_array_equal(np.sign(on_signals[rows, k]), y)
    np.testing.assert_allclose(np.abs(on_signals[rows, k]), s.alpha, rtol=1e-6)
    # ... and k again from the centre patch.
    np.testing.assert_array_equal(np.argmax(centre @ vectors.centre.T, axis=1), s.cluster)
    # The feature noise lies on another cluster's signal, with either sign.
    on_signals = noise @ vectors.signal.T
    k_noise = np.argmax(np.abs(on_signals), axis=1)
    np.testing.assert_array_equal(k_noise, s.noise_cluster)
    assert (k_noise != s.cluster).all()
    np.testing.assert_array_equal(np.sign(on_signals[rows, k_noise]), s.noise_sign)


def test_exactly_one_patch_is_plus_minus_alpha_v_k(drawn):
    """Without the recorded kinds: per sample, exactly one patch is y alpha v_k (scaled)."""
    vectors, s = drawn
    y = 2 * s.label - 1
    target = S1.scale * (y * s.alpha)[:, None] * vectors.signal[s.cluster]
    matches = np.all(np.abs(s.x - target[:, None, :]) < 1e-5, axis=2)
    np.testing.assert_array_equal(matches.sum(axis=1), 1)
    np.testing.assert_array_equal(np.argmax(matches, axis=1), np.argmax(s.patch_kind == 0, axis=1))


def test_strengths_inside_their_ranges_and_spread_over_them(drawn):
    _, s = drawn
    for values, (low, high) in ((s.alpha, S1.alpha), (s.beta, S1.beta), (s.gamma, S1.gamma)):
        assert low <= values.min() and values.max() <= high
        # Uniform: mean at the midpoint within 5 standard errors.
        error = (high - low) / math.sqrt(12 * N)
        assert abs(values.mean() - (low + high) / 2) < 5 * error


def test_gaussian_noise_statistics(drawn):
    vectors, s = drawn
    noise = s.x[s.patch_kind == GAUSSIAN_NOISE]  # (N, 50)
    count = noise.size
    expected = S1.sigma_p / math.sqrt(S1.dim) * S1.scale
    # Sample std of a normal: relative standard error 1 / sqrt(2 count).
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * count)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(count)
    # Isotropic: no preferred direction along the generating vectors.
    both = np.vstack([vectors.signal, vectors.centre])
    along = noise @ both.T
    assert np.all(np.abs(along.std(axis=0) / expected - 1) < 5 / math.sqrt(2 * N))


def test_labels_clusters_and_noise_choices_are_balanced(drawn):
    _, s = drawn
    assert abs(s.label.mean() - 0.5) < 5 * math.sqrt(0.25 / N)
    assert abs((s.noise_sign == 1).mean() - 0.5) < 5 * math.sqrt(0.25 / N)
    share = np.bincount(s.cluster, minlength=4) / N
    assert np.all(np.abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N))
    # Labels independent of clusters: each (cluster, label) cell near 1/8.
    cells = np.bincount(4 * s.label + s.cluster, minlength=8) / N
    assert np.all(np.abs(cells - 0.125) < 5 * math.sqrt(0.125 * 0.875 / N))
    # k' uniform among the three other clusters.
    offset = (s.noise_cluster - s.cluster) % 4
    share = np.bincount(offset, minlength=4) / N
    assert share[0] == 0
    assert np.all(np.abs(share[1:] - 1 / 3) < 5 * math.sqrt(2 / 9 / N))


def test_patch_positions_are_permuted(drawn):
    _, s = drawn
    for kind in range(4):
        share = (s.patch_kind == kind).mean(axis=0)  # per position
        assert np.all(np.abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)), kind
    # All 24 orders occur.
    orders = {tuple(row) for row in s.patch_kind[:2000]}
    assert len(orders) == 24


def test_extra_patches_are_gaussian_noise():
    setting = make_setting({"patches": 6, "n_train": 500})
    vectors, s = generate_split(setting, 1, "train")
    assert s.x.shape == (500, 6, 50)
    np.testing.assert_array_equal(np.bincount(s.patch_kind.ravel()), [500, 500, 500, 1500])
    noise = s.x[s.patch_kind == GAUSSIAN_NOISE]
    expected = setting.sigma_p / math.sqrt(setting.dim) * setting.scale
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * noise.size)
    # Noise patches of one sample are independent draws.
    first = s.x[s.patch_kind == GAUSSIAN_NOISE].reshape(500, 3, 50)
    assert not np.allclose(first[:, 0], first[:, 1])


def test_one_seed_gives_identical_arrays_and_splits_are_independent():
    small = make_setting({"n_train": 300, "n_test": 300})
    v1, train1 = generate_split(small, 5, "train")
    v2, train2 = generate_split(small, 5, "train")
    for name in ("x", "label", "cluster", "patch_kind", "alpha", "gamma", "noise_sign"):
        np.testing.assert_array_equal(getattr(train1, name), getattr(train2, name))
    np.testing.assert_array_equal(v1.signal, v2.signal)
    v_test, test = generate_split(small, 5, "test")
    # Same vectors (same distribution), different samples.
    np.testing.assert_array_equal(v_test.signal, v1.signal)
    np.testing.assert_array_equal(v_test.centre, v1.centre)
    assert not np.array_equal(test.label, train1.label)
    assert not np.allclose(test.alpha, train1.alpha)
    # Another seed: other vectors and other samples.
    v_other, other = generate_split(small, 6, "train")
    assert not np.allclose(v_other.signal, v1.signal)
    assert not np.allclose(other.alpha, train1.alpha)
    # The streams are SeedSequence(seed).spawn(3) in the order vectors, train, test.
    children = np.random.SeedSequence(5).spawn(3)
    expected = np.random.default_rng(children[2]).integers(0, 2, 300)
    np.testing.assert_array_equal(2 * test.label - 1, 2 * expected - 1)


def test_settings_differ_only_where_they_should():
    """Same seed: s2 doubles only the Gaussian noise, s3 only remaps gamma, s4 both."""
    drawn = {}
    for name in SETTINGS:
        setting = make_setting({"setting": name, "n_train": 400})
        drawn[name] = generate_split(setting, 11, "train")[1]
    s1 = drawn["s1"]
    same = ("label", "cluster", "patch_kind", "alpha", "beta", "noise_cluster", "noise_sign")
    for name in ("s2", "s3", "s4"):
        for field in same:
            np.testing.assert_array_equal(getattr(drawn[name], field), getattr(s1, field))
    noise = s1.patch_kind == GAUSSIAN_NOISE
    np.testing.assert_allclose(drawn["s2"].x[noise], 2 * s1.x[noise], rtol=1e-6)
    np.testing.assert_array_equal(drawn["s2"].x[~noise], s1.x[~noise])
    np.testing.assert_array_equal(drawn["s2"].gamma, s1.gamma)
    remapped = 0.5 + (s1.gamma - 0.5) * (1.5 / 2.5)
    np.testing.assert_allclose(drawn["s3"].gamma, remapped, rtol=1e-12)
    assert drawn["s3"].gamma.max() <= 2.0
    feature_noise = s1.patch_kind == FEATURE_NOISE
    np.testing.assert_array_equal(drawn["s3"].x[~feature_noise], s1.x[~feature_noise])
    np.testing.assert_allclose(drawn["s4"].x[noise], 2 * s1.x[noise], rtol=1e-6)
    np.testing.assert_array_equal(drawn["s4"].gamma, drawn["s3"].gamma)


def test_make_setting_overrides():
    setting = make_setting({"setting": "s3", "n_train": 2000, "alpha": [1, 2]})
    assert setting == replace(SETTINGS["s3"], n_train=2000, alpha=(1, 2))
    assert make_setting() == S1 and make_setting({}) == S1
    assert make_setting({"setting": "s4"}).sigma_p == 2.0
    assert setting.samples("train") == 2000 and setting.samples("test") == 16000
    # JSON round trip.
    assert ClusterSetting.from_dict(setting.to_dict()) == setting


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"setting": "s9"}, r"clusters.data.setting: 's9' is not a known setting; known: s1, s2, "),
        ({"dim": 50, "clusters": 30}, r"clusters.data.dim: 50 dimensions cannot hold 2 x 30 "),
        ({"dim": 7}, r"clusters.data.dim: 7 dimensions cannot hold 2 x 4 orthonormal"),
        ({"patches": 3}, r"clusters.data.patches: must be at least 4 \(feature signal"),
        ({"clusters": 1}, r"clusters.data.clusters: must be at least 2"),
        ({"n_train": 0}, r"clusters.data.n_train: must be at least 1, got 0"),
        ({"n_test": -5}, r"clusters.data.n_test: must be at least 1, got -5"),
        ({"n_train": 2.5}, r"clusters.data.n_train: must be an integer, got 2.5"),
        ({"n_train": True}, r"clusters.data.n_train: must be an integer, got True"),
        ({"alpha": [2, 0.5]}, r"clusters.data.alpha: \[2, 0.5\] needs low <= high"),
        ({"alpha": [0, 1]}, r"clusters.data.alpha: \[0, 1\] needs low > 0"),
        ({"gamma": [-1, 1]}, r"clusters.data.gamma: \[-1, 1\] needs low >= 0"),
        ({"beta": [1, float("inf")]}, r"clusters.data.beta: \[1, inf\] is not finite"),
        ({"beta": 1.5}, r"clusters.data.beta: must be a range of two numbers \[low, high\]"),
        ({"gamma": [1, 2, 3]}, r"clusters.data.gamma: must be a range of two numbers"),
        ({"sigma_p": -1}, r"clusters.data.sigma_p: must be a finite number >= 0, got -1"),
        ({"scale": 0}, r"clusters.data.scale: must be > 0, got 0"),
        ({"n_samples": 10}, r"clusters.data.n_samples: not a setting key; known: setting, "),
    ],
)
def test_validation_errors_name_the_key(config, message):
    with pytest.raises(InputError, match=message):
        make_setting(config)


def test_validation_key_prefix_and_other_errors():
    with pytest.raises(InputError, match=r"^paper.clusters.dim: "):
        make_setting({"dim": 4}, key="paper.clusters")
    with pytest.raises(InputError, match="split 'val' is not one of train, test"):
        S1.samples("val")
    with pytest.raises(InputError, match="seed: must be an integer >= 0, got -1"):
        stream(-1, "train")
    with pytest.raises(InputError, match="sample count must be an integer >= 1, got 0"):
        sample(S1, vectors_for_seed(S1, 0), 0, stream(0, "train"))
    with pytest.raises(InputError, match="do not fit 4 clusters of dimension 60"):
        sample(replace(S1, dim=60), vectors_for_seed(S1, 0), 5, stream(0, "train"))
