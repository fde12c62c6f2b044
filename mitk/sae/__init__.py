"""Sparse autoencoders: configs, architectures, activation stores, training and evaluation.

``train(SAEConfig(...), source)`` learns one SAE per hook point from an
``ActivationStore`` (a model run over tokens), cached shards or a tensor of
activations; ``evaluate`` measures it, ``spliced`` puts it into a model.
``load_transcoder_set`` / ``save_transcoder_set`` read and write circuit-tracer's
per-layer transcoder sets; ``CrossLayerTranscoder`` (``CLTConfig``) with
``load_clt`` / ``save_clt`` is one dictionary over every layer, in circuit-tracer's CLT format,
trained by ``train_clt``.
"""

from mitk.sae.autoencoder import SAEOutput, SparseAutoencoder
from mitk.sae.chunks import CachedActivations
from mitk.sae.collapse import CollapseError, CollapseWarning
from mitk.sae.config import SAEConfig
from mitk.sae.crosslayer import CrossLayerTranscoder
from mitk.sae.crosslayer_config import CLTConfig
from mitk.sae.crosslayer_files import load_clt, save_clt
from mitk.sae.crosslayer_train import CLTTrainResult, train_clt
from mitk.sae.evaluate import SAEEvaluation, evaluate
from mitk.sae.features import (
    LatentExamples,
    LatentStatistics,
    LogitEffects,
    latent_statistics,
    logit_effects,
)
from mitk.sae.files import load_sae, save_sae
from mitk.sae.metrics import ReconstructionStats
from mitk.sae.pretrained import PretrainedSAE, list_pretrained
from mitk.sae.run_state import NonFiniteError
from mitk.sae.sources import ActivationSource, TensorActivations
from mitk.sae.splice import Splice, spliced
from mitk.sae.store import ActivationStore
from mitk.sae.synthetic import SparseDictionaryData, mean_max_cosine_similarity
from mitk.sae.trainer import TrainResult, train
from mitk.sae.transcoder_sets import load_transcoder_set, save_transcoder_set

__all__ = [
    "ActivationSource",
    "ActivationStore",
    "CLTConfig",
    "CLTTrainResult",
    "CachedActivations",
    "CollapseError",
    "CollapseWarning",
    "CrossLayerTranscoder",
    "LatentExamples",
    "LatentStatistics",
    "LogitEffects",
    "NonFiniteError",
    "PretrainedSAE",
    "ReconstructionStats",
    "SAEConfig",
    "SAEEvaluation",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseDictionaryData",
    "Splice",
    "TensorActivations",
    "TrainResult",
    "evaluate",
    "latent_statistics",
    "list_pretrained",
    "load_clt",
    "load_sae",
    "load_transcoder_set",
    "logit_effects",
    "mean_max_cosine_similarity",
    "save_clt",
    "save_sae",
    "save_transcoder_set",
    "spliced",
    "train",
    "train_clt",
]
