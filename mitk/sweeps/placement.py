"""Where the sweep's model lives: one device, or whole blocks spread over several GPUs.

With ``device_map: auto`` the model is loaded on the CPU and dispatched with
Hugging Face accelerate: every ``TransformerBlock`` stays whole on one device
(``no_split_module_classes``), so each hook sees a layer's whole activation, and
accelerate's hooks move the residual stream from one device to the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mitk.config import torch_dtype
from mitk.errors import ConfigError
from mitk.model import HookedTransformer, embedded_models
from mitk.sweeps.spec import SweepSpec


def load_sweep_model(spec: SweepSpec) -> Any:
    """The spec's model in its dtype, on ``spec.device`` or spread by ``spec.device_map``."""
    if spec.device_map is None:
        return load_named_model(spec.model, spec.device, spec.dtype)
    model = load_named_model(spec.model, "cpu", spec.dtype)
    return spread_over_gpus(model)


def load_named_model(source: str, device: str = "cpu", dtype: str = "float32") -> HookedTransformer:
    """An embedded model by name or a local model directory, on ``device`` in ``dtype``, eval mode.

    ``ConfigError`` naming the embedded models when ``source`` is neither (a
    sweep never reaches for the network).
    """
    if source not in embedded_models() and not Path(source).is_dir():
        names = ", ".join(sorted(embedded_models()))
        raise ConfigError(
            f"unknown model {source!r}: not an embedded model ({names}) nor a local directory"
        )
    model = HookedTransformer.from_pretrained(source)
    return model.to(device=torch.device(device), dtype=torch_dtype(dtype)).eval()


def spread_over_gpus(model: Any, max_memory: dict[Any, str] | None = None) -> Any:
    """Dispatch ``model`` over the visible GPUs (CPU beyond them), one whole block per device.

    ``max_memory`` (e.g. ``{0: "70GiB", 1: "70GiB"}``) caps each device;
    accelerate's default reads the free memory.
    """
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as err:
        raise ConfigError(
            "device_map: auto needs Hugging Face accelerate (pip install accelerate)"
        ) from err
    block_class = type(model.blocks[0]).__name__
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=[block_class]
    )
    return dispatch_model(model, device_map=device_map)
