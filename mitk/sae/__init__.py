"""Sparse autoencoders: configs, architectures, activation stores, training and evaluation.

``train(SAEConfig(...), source)`` learns one SAE per hook point from an
``ActivationStore`` (a model run over tokens), cached shards or a tensor of
activations; ``evaluate`` measures it, ``spliced`` puts it into a model.
"""

from mitk.sae.autoencoder import SAEOutput, SparseAutoencoder
from mitk.sae.chunks import CachedActivations
from mitk.sae.config import SAEConfig
from mitk.sae.metrics import ReconstructionStats
from mitk.sae.sources import ActivationSource, TensorActivations
from mitk.sae.store import ActivationStore
from mitk.sae.synthetic import SparseDictionaryData, mean_max_cosine_similarity
from mitk.sae.trainer import NonFiniteError, TrainResult, train

__all__ = [
    "ActivationSource",
    "ActivationStore",
    "CachedActivations",
    "NonFiniteError",
    "ReconstructionStats",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseDictionaryData",
    "TensorActivations",
    "TrainResult",
    "mean_max_cosine_similarity",
    "train",
]
