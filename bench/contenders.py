"""The LayerNorm and RMSNorm implementations the benchmark compares, each as
``fn(x, weight, bias) -> y`` (RMSNorm ignores ``bias``, which is None for it).

Every contender normalizes over the last dimension with the same eps. ``make`` (LayerNorm) and
``make_rms`` (RMSNorm; None for a contender measured on LayerNorm only) are called once per
shape and dtype: that is where ``torch.compile`` gets a fresh, shape-specialized function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import layernorm_ext

EPS = 1e-5
LayerNormFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
NORMS = ("layer", "rms")  # LayerNorm, RMSNorm

EXT = "layernorm_ext"
EAGER = "torch eager"
COMPILED = "torch.compile"
LIGER = "Liger-Kernel"
APEX = "apex"


@dataclass(frozen=True)
class Contender:
    name: str
    make: Callable[[], LayerNormFn]
    make_rms: Optional[Callable[[], LayerNormFn]] = None

    def maker(self, norm: str) -> Optional[Callable[[], LayerNormFn]]:
        """The factory for ``norm`` ("layer" or "rms"); None when not measured for it."""
        return self.make if norm == "layer" else self.make_rms


def _make_ext() -> LayerNormFn:
    return lambda x, weight, bias: layernorm_ext.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def _make_eager() -> LayerNormFn:
    return lambda x, weight, bias: F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def _make_compiled() -> LayerNormFn:
    # Dynamo caches compiled graphs on F.layer_norm's code object, shared by every
    # torch.compile wrapper: without a reset, shape after shape would pile up there until the
    # recompile limit silently sends calls back to eager. Nothing else here uses dynamo.
    torch._dynamo.reset()
    compiled = torch.compile(F.layer_norm, dynamic=False, fullgraph=True)
    return lambda x, weight, bias: compiled(x, x.shape[-1:], weight, bias, EPS)


def _make_ext_rms() -> LayerNormFn:
    return lambda x, weight, bias: layernorm_ext.rms_norm(x, x.shape[-1:], weight, EPS)


def _make_eager_rms() -> LayerNormFn:
    return lambda x, weight, bias: F.rms_norm(x, x.shape[-1:], weight, EPS)


def _make_compiled_rms() -> LayerNormFn:
    torch._dynamo.reset()  # as _make_compiled
    compiled = torch.compile(F.rms_norm, dynamic=False, fullgraph=True)
    return lambda x, weight, bias: compiled(x, x.shape[-1:], weight, EPS)


def _make_liger() -> LayerNormFn:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return lambda x, weight, bias: LigerLayerNormFunction.apply(x, weight, bias, EPS)


def _make_apex() -> LayerNormFn:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine

    return lambda x, weight, bias: fused_layer_norm_affine(x, weight, bias, x.shape[-1:], EPS)


def _importable(make: Callable[[], LayerNormFn]) -> str | None:
    """None when ``make`` works, else why not (the package or its extension is missing)."""
    try:
        make()
    except Exception as error:  # ImportError, or a package whose native part fails to load
        return f"not importable ({type(error).__name__}: {error})"
    return None


# The benchmark's --contenders keys.
CONTENDER_KEYS = {"ext": EXT, "eager": EAGER, "compile": COMPILED, "liger": LIGER, "apex": APEX}


def reference(norm: str) -> LayerNormFn:
    """torch eager, which every contender's output is checked against."""
    return _make_eager() if norm == "layer" else _make_eager_rms()


def select_contenders(device: str, wanted: Optional[Sequence[str]] = None
                      ) -> tuple[list[Contender], dict[str, str]]:
    """The contenders that can run on ``device`` (of ``wanted``, names of CONTENDER_KEYS'
    values, when given), and the skipped ones with the reason."""
    contenders = [Contender(EXT, _make_ext, _make_ext_rms),
                  Contender(EAGER, _make_eager, _make_eager_rms),
                  Contender(COMPILED, _make_compiled, _make_compiled_rms)]
    skipped: dict[str, str] = {}
    for name, make in ((LIGER, _make_liger), (APEX, _make_apex)):
        if wanted is not None and name not in wanted:
            continue
        if device != "cuda":
            skipped[name] = "CUDA only"
        elif (reason := _importable(make)) is not None:
            skipped[name] = reason
        else:
            contenders.append(Contender(name, make))
    if wanted is not None:
        contenders = [c for c in contenders if c.name in wanted]
    return contenders, skipped
