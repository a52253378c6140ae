"""Data generation: region maps, heat diffusion kernels and the zarr stores they fill."""
