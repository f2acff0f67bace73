"""8-bit optimizer states: blockwise dynamic quantization.

* ``format``: the format itself (block size, maps, rounding rule and its lookup table); the Triton kernels
  import it too.
* ``torch_path``: the format in torch ops (CPU path, and the kernels' reference).
* ``dispatch``: backend choice, Triton dispatch with a self-check per kernel, and the public entry points
  re-exported here.
"""

from .dispatch import (
    BACKENDS,
    adam8bit_step,
    dequantize_blockwise,
    get_backend,
    kernels_for,
    quantize_blockwise,
    set_backend,
    try_kernel,
)
from .format import BLOCK, MIN_8BIT_SIZE, dynamic_map, num_blocks, use_8bit, zero_state
from .torch_path import adam8bit_step_torch, dequantize_blockwise_torch, quantize_blockwise_torch

__all__ = [
    "BLOCK",
    "MIN_8BIT_SIZE",
    "use_8bit",
    "num_blocks",
    "dynamic_map",
    "zero_state",
    "quantize_blockwise",
    "dequantize_blockwise",
    "adam8bit_step",
    "quantize_blockwise_torch",
    "dequantize_blockwise_torch",
    "adam8bit_step_torch",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "kernels_for",
    "try_kernel",
]
