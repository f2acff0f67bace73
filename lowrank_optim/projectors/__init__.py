"""Projector registry: every method takes any of these through the ``projector`` group key."""

from __future__ import annotations

from typing import Dict, Type

from .base import Projector, ProjectorError
from .blocks import BlocksProjector
from .columns import ColumnsProjector
from .dct import DCTProjector, dct_matrix
from .power import PowerProjector
from .random import RandomProjector
from .rsvd import RSVDProjector
from .sst import SSTProjector, sst_sample
from .svd import SVDProjector

PROJECTORS: Dict[str, Type[Projector]] = {
    cls.name: cls
    for cls in (
        SVDProjector,
        RSVDProjector,
        PowerProjector,
        RandomProjector,
        DCTProjector,
        ColumnsProjector,
        SSTProjector,
        BlocksProjector,
    )
}


def register(cls: Type[Projector]) -> Type[Projector]:
    PROJECTORS[cls.name] = cls
    return cls


def make_projector(name: str, rank: int, side: str, shape, seed: int = 0, **options) -> Projector:
    try:
        cls = PROJECTORS[name]
    except KeyError:
        raise ValueError(f"unknown projector {name!r}; valid: {sorted(PROJECTORS)}") from None
    return cls(rank=rank, side=side, shape=shape, seed=seed, **options)


__all__ = [
    "PROJECTORS",
    "Projector",
    "ProjectorError",
    "make_projector",
    "register",
    "BlocksProjector",
    "ColumnsProjector",
    "DCTProjector",
    "PowerProjector",
    "RandomProjector",
    "RSVDProjector",
    "SSTProjector",
    "SVDProjector",
    "dct_matrix",
    "sst_sample",
]
