"""The small training loop that produced mitk's embedded models."""

from mitk.train.loop import NonFiniteLossError, TrainConfig, train_language_model

__all__ = ["NonFiniteLossError", "TrainConfig", "train_language_model"]
