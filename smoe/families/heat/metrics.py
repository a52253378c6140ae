"""Error metrics, overall and per region type: the one place a metric's meaning is defined.

Training (validation and model selection), evaluation and reports all use
:class:`MetricAccumulator`, so "prcntclose1.0" means the same number everywhere:

* mse, mae, rmse;
* nrmse: per-sample ||pred - y|| / ||y||, averaged over samples (PDEBench's nRMSE);
* vrmse: sqrt(mse / var(y)) (The Well's VRMSE; 1 = as good as predicting the mean);
* prcntclose<100*rtol>: percentage of points with |pred - y| <= 1e-8 + rtol |y|; the
  ``s`` variant scales rtol per region type (by default each type's diffusivity over the largest);
* every metric again per region type, prefixed ``mask<t>-``.

Sums are kept in float64 so that long test sets do not lose precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smoe.families.heat.config import close_metric_name

ATOL = 1e-8


def close_name(rtol: float, scaled: bool = False) -> str:
    """'prcntclose1.0' for rtol 0.01 (the paper's name: the tolerance in percent); one rule,
    shared with config validation (:func:`smoe.core.config.close_metric_name`)."""
    return close_metric_name(rtol, scaled)


class MetricAccumulator:
    """Accumulate predictions batch by batch; :meth:`compute` gives every metric."""

    def __init__(
        self,
        mask: torch.Tensor,
        rtols: Sequence[float] = (0.01,),
        region_rtol_scale: Sequence[float] | None = None,
    ) -> None:
        self.mask = torch.as_tensor(mask, dtype=torch.long)
        self.types = int(self.mask.max()) + 1
        self.rtols = tuple(dict.fromkeys(float(r) for r in rtols))
        if region_rtol_scale is not None and len(region_rtol_scale) != self.types:
            raise ValueError(
                f"region_rtol_scale has {len(region_rtol_scale)} values for {self.types} "
                "region types"
            )
        self.region_rtol_scale = (
            torch.as_tensor(region_rtol_scale, dtype=torch.float64)
            if region_rtol_scale is not None
            else None
        )
        # Index 0 accumulates everything, index 1 + t the points of region type t.
        self.groups = 1 + self.types
        self._onehot: torch.Tensor | None = None
        self._scale_map: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        zeros = lambda: torch.zeros(self.groups, dtype=torch.float64)  # noqa: E731
        self.points = zeros()
        self.sq_err = zeros()
        self.abs_err = zeros()
        self.y_sum = zeros()
        self.y_sq = zeros()
        self.nrmse_sum = zeros()
        self.samples = 0
        self.close = {name: zeros() for name in self._close_names()}

    def _close_names(self) -> list[str]:
        names = [close_name(r) for r in self.rtols]
        if self.region_rtol_scale is not None:
            names += [close_name(r, scaled=True) for r in self.rtols]
        return names

    def _groups_for(self, device: torch.device) -> torch.Tensor:
        """[G, H, W] float64 indicator of each group (all points, then each region type)."""
        if self._onehot is None or self._onehot.device != device:
            mask = self.mask.to(device)
            regions = torch.nn.functional.one_hot(mask, self.types).permute(2, 0, 1)
            self._onehot = torch.cat([torch.ones_like(mask)[None], regions]).to(torch.float64)
            if self.region_rtol_scale is not None:
                self._scale_map = self.region_rtol_scale.to(device)[mask]
        return self._onehot

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` [B, 1, H, W] in physical units."""
        groups = self._groups_for(pred.device)
        pred = pred.detach().to(torch.float64).flatten(0, 1)  # [B, H, W]
        target = target.detach().to(torch.float64).flatten(0, 1)
        diff = pred - target
        adiff = diff.abs()

        def per_group(values: torch.Tensor) -> torch.Tensor:  # [B, H, W] -> [G]
            return torch.einsum("bhw,ghw->g", values, groups).cpu()

        self.points += groups.sum(dim=(1, 2)).cpu() * pred.shape[0]
        self.sq_err += per_group(diff * diff)
        self.abs_err += per_group(adiff)
        self.y_sum += per_group(target)
        self.y_sq += per_group(target * target)
        err_norm = torch.einsum("bhw,ghw->bg", diff * diff, groups).sqrt()
        y_norm = torch.einsum("bhw,ghw->bg", target * target, groups).sqrt()
        self.nrmse_sum += (err_norm / y_norm.clamp_min(1e-30)).sum(dim=0).cpu()
        self.samples += pred.shape[0]
        tolerance_base = target.abs()
        for rtol in self.rtols:
            hits = (adiff <= ATOL + rtol * tolerance_base).to(torch.float64)
            self.close[close_name(rtol)] += per_group(hits)
            if self._scale_map is not None:
                scaled = (adiff <= ATOL + rtol * self._scale_map * tolerance_base).to(torch.float64)
                self.close[close_name(rtol, scaled=True)] += per_group(scaled)

    def compute(self) -> dict[str, float]:
        if self.samples == 0:
            raise ValueError("no predictions were accumulated")
        out: dict[str, float] = {}
        for group in range(self.groups):
            prefix = "" if group == 0 else f"mask{group - 1}-"
            n = self.points[group]
            mse = self.sq_err[group] / n
            mean_y = self.y_sum[group] / n
            var_y = (self.y_sq[group] / n - mean_y**2).clamp_min(1e-300)
            values = {
                "mse": mse,
                "mae": self.abs_err[group] / n,
                "rmse": mse.sqrt(),
                "nrmse": self.nrmse_sum[group] / self.samples,
                "vrmse": (mse / var_y).sqrt(),
            }
            for name, hits in self.close.items():
                values[name] = 100.0 * hits[group] / n
            out.update({prefix + key: float(value) for key, value in values.items()})
        return out
