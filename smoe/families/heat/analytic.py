"""Analytic predictors: the reference rows every learned model is read against.

Neither learns anything: a single diffusion stencil applied everywhere (what the best
translation-invariant model could at most be), and the true generator (the stencil of each
point's own region type, i.e. exactly what the simulator did). They are evaluated on the
same test split through the same metrics as the learned models and are labelled
"reference" in the tables, never "published".

Both apply ``u + a (u_N + u_S + u_E + u_W - 4 u)`` in float64 with the store's boundary
condition, on frame t (input channel 0) of unnormalised data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smoe.core.errors import InputError
from smoe.families.heat.choices import BOUNDARIES


def diffusion_step(u: torch.Tensor, diffusivity: torch.Tensor, boundary: str) -> torch.Tensor:
    """One explicit step of ``u`` [B, 1, H, W] with a per-point (or scalar) diffusivity."""
    if boundary == "wrap":
        padded = F.pad(u, (1, 1, 1, 1), mode="circular")
    else:
        padded = F.pad(u, (1, 1, 1, 1))
    neighbours = (
        padded[:, :, :-2, 1:-1]
        + padded[:, :, 2:, 1:-1]
        + padded[:, :, 1:-1, :-2]
        + padded[:, :, 1:-1, 2:]
    )
    return u + diffusivity * (neighbours - 4.0 * u)


class _Analytic(nn.Module):
    """Shared checks: the frame is channel 0, the boundary is one the simulator knows."""

    def __init__(self, boundary: str) -> None:
        super().__init__()
        if boundary not in BOUNDARIES:
            raise InputError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.boundary = boundary

    def step(self, x: torch.Tensor, diffusivity: torch.Tensor) -> torch.Tensor:
        frame = x[:, :1].double()
        return diffusion_step(frame, diffusivity, self.boundary).to(x.dtype)


class StencilPredictor(_Analytic):
    """One stencil everywhere, with diffusion number ``diffusivity``.

    ``diffusivity: best`` tries the diffusion number of every region type and keeps the one
    with the best validation score (the trainer calls :meth:`candidates` and :meth:`choose`);
    the choice is a buffer, so ``best.pt`` carries it to evaluation.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        region_diffusivity: Sequence[float] = (),
        boundary: str = "zero",
        diffusivity: float | str = "best",
    ) -> None:
        super().__init__(boundary)
        if diffusivity == "best":
            if not region_diffusivity:
                raise InputError("diffusivity 'best' needs the data's region diffusivities")
            self._candidates = tuple(float(a) for a in region_diffusivity)
            start = self._candidates[0]
        elif isinstance(diffusivity, int | float) and not isinstance(diffusivity, bool):
            if not 0.0 <= float(diffusivity) <= 0.25:
                raise InputError(f"diffusivity must be in [0, 0.25], got {diffusivity}")
            self._candidates = ()
            start = float(diffusivity)
        else:
            raise InputError(f"diffusivity must be a number or 'best', got {diffusivity!r}")
        self.register_buffer("diffusivity", torch.tensor(start, dtype=torch.float64))

    def candidates(self) -> tuple[float, ...]:
        """The diffusion numbers to choose among on validation (empty when fixed)."""
        return self._candidates

    def choose(self, diffusivity: float) -> None:
        self.diffusivity.fill_(float(diffusivity))

    def describe(self) -> dict[str, float]:
        return {"diffusivity": float(self.diffusivity)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.diffusivity)


class GeneratorPredictor(_Analytic):
    """The true generator: each point's own region type's stencil (exact up to float32)."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        mask: torch.Tensor | None = None,
        region_diffusivity: Sequence[float] = (),
        boundary: str = "zero",
    ) -> None:
        super().__init__(boundary)
        if mask is None or not region_diffusivity:
            raise InputError("the generator needs the data's region map and diffusivities")
        mask = torch.as_tensor(mask, dtype=torch.long)
        if int(mask.max()) >= len(region_diffusivity):
            raise InputError(
                f"the region map has {int(mask.max()) + 1} types but the data gives "
                f"{len(region_diffusivity)} diffusivities"
            )
        field = torch.tensor(list(region_diffusivity), dtype=torch.float64)[mask]
        self.register_buffer("diffusivity", field[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.diffusivity)
