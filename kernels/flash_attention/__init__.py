"""Flash attention (Dao et al. 2022; FlashAttention-2, Dao 2023) as Pallas kernels."""

from kernels.flash_attention import reference
from kernels.flash_attention.api import IMPLEMENTATIONS, flash_attention

__all__ = ["IMPLEMENTATIONS", "flash_attention", "reference"]
