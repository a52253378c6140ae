"""The gated family's source files read whole before a conversion job starts.

Planning checks each file's header and size (:func:`smoe.families.gated.images.check_source`,
also under ``snakemake -n``); what only a full read sees (a gzip body that fails its CRC, a
CIFAR-10 batch whose pickle or labels are damaged, image bytes of an IDX file) would be
refused inside the conversion job, after Snakemake had deleted the store it rebuilds. The
workflow's planning check (:mod:`smoe.core.integrity`) calls :func:`source_problem` on the
source files of the conversion jobs that will run, reading each with the conversion's own
reader: a few hundred milliseconds for MNIST, a second or two for CIFAR-10, and only when a
store is about to be rebuilt from them.
"""

from __future__ import annotations

from pathlib import Path

from smoe.core.errors import InputError
from smoe.families.gated.images import (
    CIFAR_FILES,
    MNIST_FILES,
    read_cifar_batch,
    read_idx_images,
    read_idx_labels,
)

IMAGE_FILES = {images for images, _ in MNIST_FILES.values()}
LABEL_FILES = {labels for _, labels in MNIST_FILES.values()}
BATCH_FILES = {name for names in CIFAR_FILES.values() for name in names}


def source_problem(path: Path) -> str | None:
    """What the conversion would refuse in the source file ``path`` (None: it reads whole),
    or None for a file that is not one of the data sets' files."""
    name = path.name.removesuffix(".gz")
    try:
        if name in IMAGE_FILES:
            read_idx_images(path)
        elif name in LABEL_FILES:
            read_idx_labels(path)
        elif name in BATCH_FILES:
            read_cifar_batch(path)
    except InputError as exc:
        return str(exc)
    return None
