"""Checkpoints: atomic saves and the random-number state a bit-exact resume needs.

``last.pt`` holds everything to continue training (model, optimizer, scheduler, scaler,
every RNG, the batch-order generator, the best model so far, the history); ``best.pt``
holds what evaluation needs. Both are written to a temporary name and renamed, so a killed
job leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoe.atomic import atomic_file
from smoe.errors import InputError

FORMAT = 1


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    with atomic_file(Path(path)) as partial:
        torch.save(payload, partial)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, with a clear error when unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for corrupt files
        raise InputError(f"checkpoint {str(path)!r} is not readable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"checkpoint {str(path)!r} was not written by this version of smoe")
    return payload


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "batches": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that orders training batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
