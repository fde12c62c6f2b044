"""Selective state-space (Mamba) mixers: the scan, the mixer, its block and its carried state."""

from mitk.model.ssm.block import MambaBlock
from mitk.model.ssm.mamba2 import Mamba2Mixer
from mitk.model.ssm.mixer import MambaMixer
from mitk.model.ssm.scan import chunked_scan, sequential_scan
from mitk.model.ssm.ssd import ssd_scan
from mitk.model.ssm.state import SSMState

__all__ = [
    "Mamba2Mixer",
    "MambaBlock",
    "MambaMixer",
    "SSMState",
    "chunked_scan",
    "sequential_scan",
    "ssd_scan",
]
