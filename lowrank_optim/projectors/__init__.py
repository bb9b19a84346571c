"""Projectors by name: ``svd`` (exact), ``rsvd`` (randomized), ``random`` (seeded),
``gaussian`` (seeded N(0, 1/r), APOLLO's), ``dct`` (DCT-II columns), ``columns``/``rows``/``entries``/``blocks`` (coordinate subsets), ``int4`` (a packed INT4
basis around ``svd``/``rsvd``, Q-GaLore)."""
from .base import (
    PROJ_TYPES,
    REGISTRY,
    Projector,
    RefreshFailed,
    is_projected,
    make_projector,
    register_projector,
)
from .coords import BlockProjector, ColumnProjector, CoordinateProjector, EntryProjector, RowProjector
from .dct import DCTProjector
from .quantized import QuantizedProjector
from .random import GaussianProjector, RandomProjector
from .rsvd import RandomizedSVDProjector, randomized_svd
from .svd import SVDProjector
from .transition import Transition

__all__ = [
    "BlockProjector",
    "ColumnProjector",
    "CoordinateProjector",
    "DCTProjector",
    "EntryProjector",
    "GaussianProjector",
    "RowProjector",
    "PROJ_TYPES",
    "REGISTRY",
    "Projector",
    "QuantizedProjector",
    "RefreshFailed",
    "Transition",
    "is_projected",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "make_projector",
    "randomized_svd",
    "register_projector",
]
