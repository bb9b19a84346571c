"""lowrank_optim: memory-efficient low-rank optimizers (the GaLore family) for PyTorch."""
from .factory import available_optimizers, create_optimizer, param_groups
from .optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    DCTAdamW,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GradNormLoRPAdamW,
    GradNormLoRPAdamW8bit,
    LowRankOptimizer,
    NaturalGaLoreAdamW,
    QGaLoreAdamW8bit,
)
from .quant import Int8Linear, convert_linear_to_int8
from .projectors import Projector, register_projector

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "ApolloMiniAdamW",
    "DCTAdamW",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GradNormLoRPAdamW",
    "GradNormLoRPAdamW8bit",
    "LowRankOptimizer",
    "Int8Linear",
    "NaturalGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "convert_linear_to_int8",
    "Projector",
    "available_optimizers",
    "create_optimizer",
    "param_groups",
    "register_projector",
]
