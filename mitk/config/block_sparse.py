"""BlockSparseConfig: BigBird's block-sparse attention (``TransformerConfig.block_sparse``)."""

from __future__ import annotations

from dataclasses import dataclass

from mitk.config.json_config import JsonConfig, check_positive_ints
from mitk.errors import ConfigError


@dataclass(frozen=True)
class BlockSparseConfig(JsonConfig):
    """BigBird's bidirectional block-sparse attention (Zaheer et al. 2020), as Hugging Face's
    ``BigBirdModel`` runs it in eval mode.

    Positions fall in blocks of ``block_size``. The first and the last block are global:
    their queries see every key and every query sees their keys; every other block sees
    its neighbours (one block each side) and ``random_blocks`` random blocks. In eval mode
    Hugging Face draws no random blocks: each is block 0, so the random part weighs the
    first block's keys ``1 + random_blocks`` times (a ``log(1 + random_blocks)`` bias on
    their scores). Sequences of ``(5 + 2 random_blocks) block_size`` positions or fewer
    get full attention, as in Hugging Face.
    """

    block_size: int
    """Positions per block."""
    random_blocks: int = 3
    """Hugging Face's ``num_random_blocks``: random key blocks per query block."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("block_size",))
        blocks = self.random_blocks
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
            raise ConfigError(f"block_sparse random_blocks must be an int >= 0, got {blocks!r}")

    def is_sparse_at(self, pos: int) -> bool:
        """Whether ``pos`` positions run block-sparse (else full attention, as HF falls back)."""
        return pos > (5 + 2 * self.random_blocks) * self.block_size
