"""Projectors by name: ``svd`` (exact), ``rsvd`` (randomized), ``random`` (seeded)."""
from .base import (
    PROJ_TYPES,
    REGISTRY,
    Projector,
    RefreshFailed,
    Transition,
    get_projector_class,
    is_projected,
    make_projector,
    register_projector,
)
from .random import RandomProjector
from .rsvd import RandomizedSVDProjector, randomized_svd
from .svd import SVDProjector

__all__ = [
    "PROJ_TYPES",
    "REGISTRY",
    "Projector",
    "RefreshFailed",
    "Transition",
    "is_projected",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "get_projector_class",
    "make_projector",
    "randomized_svd",
    "register_projector",
]
