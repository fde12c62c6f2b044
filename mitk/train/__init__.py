"""The small training loop that produced mitk's embedded models."""

from mitk.train.induction_data import repeated_random_tokens, repeated_segments
from mitk.train.loop import NonFiniteLossError, TrainConfig, train_language_model

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "repeated_random_tokens",
    "repeated_segments",
    "train_language_model",
]
