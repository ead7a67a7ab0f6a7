"""layernorm_ext: fused LayerNorm and RMSNorm forward/backward kernels for PyTorch (CPU and CUDA).

- :func:`layer_norm`: ``torch.nn.functional.layer_norm``'s signature.
- :class:`LayerNorm`: ``torch.nn.LayerNorm``'s constructor, parameters and state_dict.
- :func:`rms_norm` / :class:`RMSNorm`: the same for ``F.rms_norm`` / ``nn.RMSNorm``,
  computed by the same kernels.
- ``torch.ops.layernorm_ext.forward`` / ``backward`` / ``rms_forward`` / ``rms_backward``:
  the dispatcher operators.
- :func:`onnx.translation_table`: how ``torch.onnx.export`` writes the norms in ONNX.
- :func:`decompositions.decomposition_table`: the norms in core ATen ops, for
  ``ExportedProgram.run_decompositions``.
"""

import sys

from . import decompositions, onnx, sharding
from .modules import LayerNorm, RMSNorm
from .ops import cpu_kernels_isa, cpu_stream_threshold, has_cuda_kernels, layer_norm, rms_norm
from .patch import replace_layernorm, replace_rmsnorm

if "torch.distributed.tensor" in sys.modules:  # else on the first DTensor (sharding.py)
    sharding.register()

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm", "has_cuda_kernels",
           "cpu_kernels_isa", "cpu_stream_threshold", "replace_layernorm", "replace_rmsnorm"]
__version__ = "0.1.0"
