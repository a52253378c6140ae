import numpy as np
import pytest

from smoe.core.errors import InputError
from smoe.families.heat.mask import check_mask, generate_mask, load_mask, plot_mask, save_mask


def spec_mask(height, width, types, seed):
    """The sampler exactly as the spec words it: one rng.choice(T, p=p) per cell."""
    rng = np.random.default_rng(seed)
    grid = -np.ones((height, width), dtype=np.int64)
    inc = (1 - 1 / types) / 5
    for i in range(height):
        for j in range(width):
            window = grid[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            assigned = window[window >= 0]
            p = np.full(types, 1 / types)
            for t in range(types):
                count = int((assigned == t).sum())
                if count:
                    others = np.arange(types) != t
                    p[t] += count * inc
                    p[others] -= count * inc / (types - 1)
            grid[i, j] = rng.choice(types, p=p)
    return grid


def test_seed_42_reproduces_the_paper_map(paper_mask):
    mask = generate_mask(64, 64, 3, seed=42)
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, paper_mask)
    assert np.bincount(mask.ravel()).tolist() == [1449, 1212, 1435]


@pytest.mark.parametrize(
    "height, width, types, seed", [(20, 31, 3, 0), (17, 9, 2, 5), (25, 25, 5, 123), (1, 40, 4, 9)]
)
def test_fast_sampler_equals_the_spec_sampler(height, width, types, seed):
    np.testing.assert_array_equal(
        generate_mask(height, width, types, seed), spec_mask(height, width, types, seed)
    )


def test_single_type_map_is_all_zero():
    assert not generate_mask(5, 6, 1, seed=1).any()


def test_maps_are_fragmented_like_the_paper(paper_mask):
    # Neighbouring cells agree more often than chance (1/3) but far from always.
    same = np.mean(paper_mask[:, 1:] == paper_mask[:, :-1])
    assert 0.45 < same < 0.8


@pytest.mark.parametrize("suffix", [".npy", ".nc"])
def test_save_and_load_round_trip(tmp_path, paper_mask, suffix):
    path = tmp_path / f"map{suffix}"
    save_mask(paper_mask, path)
    np.testing.assert_array_equal(load_mask(path), paper_mask)
    assert not list(tmp_path.glob("*.partial"))


def test_netcdf_mask_with_other_variable_name(tmp_path, small_mask):
    import xarray as xr

    path = tmp_path / "regions.nc"
    xr.Dataset({"regions": (("lat", "lon"), small_mask)}).to_netcdf(path)
    np.testing.assert_array_equal(load_mask(path), small_mask)


def test_missing_mask_file_is_named(tmp_path):
    with pytest.raises(InputError, match="nope.npy.*does not exist"):
        load_mask(tmp_path / "nope.npy")


def test_unknown_mask_format(tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("0 1\n")
    with pytest.raises(InputError, match="unknown format"):
        load_mask(path)


def test_values_outside_types_are_rejected(small_mask):
    bad = small_mask.copy()
    bad[0, 0] = 3
    with pytest.raises(InputError, match=r"values \[3\] outside 0..2"):
        check_mask(bad, 3, "m.npy")
    bad[0, 0] = -1
    with pytest.raises(InputError, match=r"values \[-1\] outside"):
        check_mask(bad, 3, "m.npy")


def test_missing_type_is_rejected(small_mask):
    with pytest.raises(InputError, match=r"types \[3\] never occur"):
        check_mask(small_mask, 4, "m.npy")


def test_non_integer_and_non_2d_maps_are_rejected():
    with pytest.raises(InputError, match="whole numbers"):
        check_mask(np.array([[0.5, 1.0]]), 2, "m")
    with pytest.raises(InputError, match="must be 2-D"):
        check_mask(np.zeros((2, 2, 2), dtype=int), 1, "m")


def test_plot_writes_png(tmp_path, paper_mask):
    path = tmp_path / "mask.png"
    plot_mask(paper_mask, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
