"""Checkpoints: atomic saves, safe loads and the random-number state a bit-exact resume needs.

``last.pt`` holds everything to continue training (model, optimizer, scheduler, scaler,
every RNG, the batch-order generator, the best model so far, the history); ``best.pt``
holds what evaluation needs. Both are written to a temporary name and renamed, so a killed
job leaves either the previous checkpoint or the new one, never half of one.

Checkpoints are shared (a ``best.pt`` handed to someone else), so they are only ever read
with torch's weights-only unpickler: everything in them is a tensor or a plain Python
value (dict, list, tuple, str, int, float, bool, None), and a file holding anything else
is refused rather than unpickled, since unpickling arbitrary objects can run code.
"""

from __future__ import annotations

import pickle
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoe.core.atomic import atomic_file
from smoe.core.errors import InputError
from smoe.core.file_checks import require_checkpoint

# 2: RNG states hold only tensors and plain values, so a weights-only load reads them
# (format 1 stored NumPy's RNG state as a NumPy array).
FORMAT = 2


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    with atomic_file(Path(path)) as partial:
        torch.save(payload, partial)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, weights-only, or raise InputError.

    A file holding anything a weights-only load refuses is never unpickled otherwise: it
    may come from someone else, and unpickling arbitrary objects can run code.
    """
    path = Path(path)
    name = repr(str(path))
    require_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives
            raise InputError(
                f"checkpoint {name} is not readable: it is not a zip archive as torch.save writes "
                "and a weights-only load refuses it; it was not loaded"
            ) from None
        refused = _refused_globals(path)
        listed = f" ({', '.join(refused)})" if refused else ""
        hint = ""
        if refused and all(item.startswith("numpy.") for item in refused):
            hint = (
                "; checkpoints of format 1 (older smoe) hold NumPy arrays like this: "
                "retrain to replace it"
            )
        raise InputError(
            f"checkpoint {name} contains objects that a weights-only load refuses{listed}, "
            f"so loading it could run code; it was not loaded{hint}"
        ) from None
    except Exception as exc:  # torch raises several types for corrupt files
        raise InputError(f"checkpoint {name} is not readable: {_first_line(exc)}") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise InputError(f"checkpoint {name} was not written by smoe")
    if payload["format"] != FORMAT:
        raise InputError(
            f"checkpoint {name} has format {payload['format']!r} but this version of smoe "
            f"reads format {FORMAT}: retrain to replace it"
        )
    return payload


def _refused_globals(path: Path) -> list[str]:
    """The importable names in ``path`` that a weights-only load refuses, found by reading
    the pickle's opcodes without running them; empty when torch cannot tell."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:
        return []
    try:
        return sorted(scan(str(path)))
    except Exception:  # not a zip checkpoint, or an opcode the scanner does not know
        return []


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a resumed run needs, as tensors and plain values only."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "batches": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Undo :func:`capture_rng`: every generator continues exactly where it was."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
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


def stream_seed(seed: int, name: str) -> int:
    """The seed of random stream ``name`` of a run seeded ``seed``: a 63-bit integer from
    ``numpy.random.SeedSequence([seed, crc32(name)])``, so two streams of one run (router
    noise, sampled routes) never repeat each other's numbers, nor those of the generators
    :func:`seed_everything` seeds with ``seed`` itself (the initial weights)."""
    entropy = [int(seed), zlib.crc32(name.encode())]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))
