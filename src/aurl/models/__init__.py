"""MusicTransformerVAEGAN and its parts: tensors in, tensors out (no training, files or CLI,
except the weights I/O of :mod:`aurl.models.pretrained`)."""

from aurl.models.model import (
    DecodeState,
    ModelOutput,
    MusicTransformerVAEGAN,
    build_model,
)
from aurl.models.vae import Latents, Posterior

__all__ = [
    "DecodeState",
    "Latents",
    "ModelOutput",
    "MusicTransformerVAEGAN",
    "Posterior",
    "build_model",
]
