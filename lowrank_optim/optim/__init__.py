"""Optimizers by name; every class is a :class:`LowRankOptimizer`."""
from .apollo import ApolloAdamW, ApolloMiniAdamW
from .base import LowRankOptimizer
from .dct import DCTAdamW
from .fira import FiraAdamW
from .frugal import FrugalAdamW
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .gradnorm_lorp import GradNormLoRPAdamW, GradNormLoRPAdamW8bit
from .natural_galore import NaturalGaLoreAdamW
from .qgalore import QGaLoreAdamW8bit
from .rules import Update

#: ``create_optimizer`` / Trainer names -> classes.
OPTIMIZERS: dict[str, type[LowRankOptimizer]] = {
    "galore_adamw": GaLoreAdamW,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "galore_adafactor": GaLoreAdafactor,
    "fira_adamw": FiraAdamW,
    "frugal_adamw": FrugalAdamW,
    "dct_adamw": DCTAdamW,
    "gradnorm_lorp_adamw": GradNormLoRPAdamW,
    "gradnorm_lorp_adamw8bit": GradNormLoRPAdamW8bit,
    "natural_galore_adamw": NaturalGaLoreAdamW,
    "qgalore_adamw8bit": QGaLoreAdamW8bit,
    "apollo_adamw": ApolloAdamW,
    "apollo_mini_adamw": ApolloMiniAdamW,
}

__all__ = ["OPTIMIZERS", "ApolloAdamW", "ApolloMiniAdamW", "DCTAdamW", "FiraAdamW", "FrugalAdamW", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GradNormLoRPAdamW", "GradNormLoRPAdamW8bit", "NaturalGaLoreAdamW", "QGaLoreAdamW8bit", "LowRankOptimizer", "Update"]
