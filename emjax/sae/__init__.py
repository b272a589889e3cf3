"""Sparse autoencoders: architectures, loaders for public releases, SAELens export, training."""

from emjax.sae.io import SAELoadError, detect, load, save
from emjax.sae.model import SAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from emjax.sae.train import SAETrainConfig, train

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAELoadError",
    "SAETrainConfig",
    "TopKSAE",
    "detect",
    "load",
    "save",
    "train",
]
