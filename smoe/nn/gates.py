"""Gates: networks that score every expert at every point (logits [B, E, H, W]).

One class per gate type, registered by name in :data:`GATES`, so config, CLI and reports
agree on names and an unknown name fails in one place. As in the paper's reference code, no
gate layer has a bias unless ``bias: true`` is given in the gate options: a bias adds a
constant preference per expert (per point for the dense and locally connected gates) that
the routing does not need and that changes which points flip first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoe.core.errors import InputError
from smoe.nn.layers import AddCoords, LocallyConnected2d


class Gate(nn.Module):
    """Base class: ``forward(x, mask_channel)`` -> logits [B, E, H, W].

    ``mask_input`` feeds the region map to the gate as one more channel; ``skip_init`` tells
    generic weight initialisers to leave the gate alone (the latent gate's range matters).
    """

    skip_init = False

    def __init__(self, mask_input: bool = False) -> None:
        super().__init__()
        self.mask_input = mask_input

    def gate_input(self, x: torch.Tensor, mask_channel: torch.Tensor | None) -> torch.Tensor:
        if not self.mask_input:
            return x
        if mask_channel is None:
            raise ValueError("this gate takes the region map as input, but none was given")
        return torch.cat([x, mask_channel.to(x.dtype).expand(x.shape[0], 1, -1, -1)], dim=1)


class LatentGate(Gate):
    """A learned score map E x H x W that ignores the input (the paper's heat-run gate).

    Initialised uniform in +-sqrt(3E/K) (the paper's range) unless ``init_scale`` gives
    another bound: the range sets how many steps of a given learning rate it takes before
    routing decisions can flip.
    """

    skip_init = True

    def __init__(
        self,
        in_channels,
        experts,
        k,
        height,
        width,
        mask_input=False,
        init_scale: float | None = None,
    ) -> None:
        super().__init__(mask_input=False)
        bound = math.sqrt(3.0 * experts / k) if init_scale is None else float(init_scale)
        self.logits = nn.Parameter(torch.empty(experts, height, width).uniform_(-bound, bound))

    def forward(self, x, mask_channel=None):
        return self.logits.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


class ConvGate(Gate):
    """A convolution from the input (plus optional map channel) to E scores."""

    kernel_size = 3

    def __init__(
        self, in_channels, experts, k, height, width, mask_input=False, bias: bool = False
    ) -> None:
        super().__init__(mask_input)
        channels = in_channels + int(mask_input)
        self.net = nn.Conv2d(
            channels, experts, self.kernel_size, padding=self.kernel_size // 2, bias=bias
        )

    def forward(self, x, mask_channel=None):
        return self.net(self.gate_input(x, mask_channel))


class Conv1Gate(ConvGate):
    kernel_size = 1


class CoordConvGate(Gate):
    """CoordConv: the conv also sees each point's coordinates, so it can learn positions."""

    def __init__(
        self, in_channels, experts, k, height, width, mask_input=False, bias: bool = False
    ) -> None:
        super().__init__(mask_input)
        channels = in_channels + int(mask_input) + 2
        self.net = nn.Sequential(AddCoords(), nn.Conv2d(channels, experts, 3, padding=1, bias=bias))

    def forward(self, x, mask_channel=None):
        return self.net(self.gate_input(x, mask_channel))


class CoordConvMultiGate(Gate):
    """CoordConv-BN-ReLU-Conv-BN-ReLU-Conv: a deeper coordinate-aware gate, E channels wide
    throughout unless ``hidden`` says otherwise (as the reference)."""

    def __init__(
        self,
        in_channels,
        experts,
        k,
        height,
        width,
        mask_input=False,
        hidden: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(mask_input)
        channels = in_channels + int(mask_input) + 2
        hidden = experts if hidden is None else hidden
        self.net = nn.Sequential(
            AddCoords(),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=bias),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=bias),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, experts, 3, padding=1, bias=bias),
        )

    def forward(self, x, mask_channel=None):
        return self.net(self.gate_input(x, mask_channel))


class LinearGate(Gate):
    """A dense layer from the whole input field to every score: (C*H*W) -> (E*H*W)."""

    def __init__(
        self, in_channels, experts, k, height, width, mask_input=False, bias: bool = False
    ) -> None:
        super().__init__(mask_input)
        channels = in_channels + int(mask_input)
        self.experts, self.height, self.width = experts, height, width
        self.net = nn.Linear(channels * height * width, experts * height * width, bias=bias)

    def forward(self, x, mask_channel=None):
        flat = self.gate_input(x, mask_channel).flatten(1)
        return self.net(flat).view(-1, self.experts, self.height, self.width)


class LCNGate(Gate):
    """A locally connected layer: different scoring weights at every point."""

    kernel_size = 3

    def __init__(
        self, in_channels, experts, k, height, width, mask_input=False, bias: bool = False
    ) -> None:
        super().__init__(mask_input)
        channels = in_channels + int(mask_input)
        self.net = LocallyConnected2d(channels, experts, height, width, self.kernel_size, bias=bias)

    def forward(self, x, mask_channel=None):
        return self.net(self.gate_input(x, mask_channel))


class LCN1Gate(LCNGate):
    kernel_size = 1


class FixedGate(Gate):
    """The oracle: routes point p to expert mask[p]. A baseline for what routing can give."""

    def __init__(self, in_channels, experts, k, height, width, mask_input=False, mask=None) -> None:
        super().__init__(mask_input=False)
        if mask is None:
            raise InputError("gate 'fixed' needs the region map (the store's mask)")
        mask = torch.as_tensor(mask, dtype=torch.long)
        if tuple(mask.shape) != (height, width):
            raise InputError(
                f"gate 'fixed': region map is {tuple(mask.shape)}, data is {(height, width)}"
            )
        if int(mask.max()) >= experts:
            raise InputError(
                f"gate 'fixed': the map has {int(mask.max()) + 1} region types but only "
                f"{experts} experts"
            )
        one_hot = torch.nn.functional.one_hot(mask, experts).permute(2, 0, 1).float()
        self.register_buffer("logits", one_hot * 2.0 - 1.0)

    def forward(self, x, mask_channel=None):
        return self.logits.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


GATES: dict[str, type[Gate]] = {
    "latent": LatentGate,
    "conv": ConvGate,
    "conv1": Conv1Gate,
    "coordconv": CoordConvGate,
    "coordconv-multi": CoordConvMultiGate,
    "linear": LinearGate,
    "lcn": LCNGate,
    "lcn1": LCN1Gate,
    "fixed": FixedGate,
}


def build_gate(
    name: str,
    in_channels: int,
    experts: int,
    k: int,
    height: int,
    width: int,
    mask_input: bool = False,
    orthogonal: bool = False,
    mask=None,
    **options,
) -> Gate:
    """A gate by name; unknown names and options fail with the known ones listed."""
    if name not in GATES:
        raise InputError(f"unknown gate {name!r}; known gates: {', '.join(GATES)}")
    cls = GATES[name]
    extra = dict(options)
    if name == "fixed":
        extra["mask"] = mask
    try:
        gate = cls(in_channels, experts, k, height, width, mask_input=mask_input, **extra)
    except TypeError as exc:
        raise InputError(f"gate {name!r}: unknown option in {sorted(options)} ({exc})") from exc
    if orthogonal:
        for module in gate.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.orthogonal_(module.weight)
    return gate
