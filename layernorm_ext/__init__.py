"""layernorm_ext: fused LayerNorm forward/backward kernels for PyTorch (CPU and CUDA).

- :func:`layer_norm`: ``torch.nn.functional.layer_norm``'s signature.
- :class:`LayerNorm`: ``torch.nn.LayerNorm``'s constructor, parameters and state_dict.
- ``torch.ops.layernorm_ext.forward`` / ``backward``: the dispatcher operators.
"""

from .modules import LayerNorm
from .ops import has_cuda_kernels, layer_norm
from .patch import replace_layernorm

__all__ = ["LayerNorm", "layer_norm", "has_cuda_kernels", "replace_layernorm"]
__version__ = "0.1.0"
