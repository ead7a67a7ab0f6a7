"""``replace_layernorm`` and ``replace_rmsnorm``: put the fused LayerNorm / RMSNorm into an
existing model."""

from __future__ import annotations

from torch import nn

from .modules import LayerNorm, RMSNorm

__all__ = ["replace_layernorm", "replace_rmsnorm"]


def replace_layernorm(model: nn.Module) -> nn.Module:
    """Makes every ``torch.nn.LayerNorm`` in ``model`` a :class:`layernorm_ext.LayerNorm`, in place.

    Each module whose type is exactly ``torch.nn.LayerNorm`` (``model`` itself included)
    becomes a ``layernorm_ext.LayerNorm`` and stays the same object: the same ``weight``
    and ``bias`` Parameter objects (so an optimizer built before the swap keeps training
    them), device, dtype, ``normalized_shape``, ``eps``, ``elementwise_affine`` and
    ``bias`` settings, training mode, hooks, and a module shared between several parents
    is swapped once for all of them. The state_dict keys do not change, so checkpoints
    load into the model before or after the swap.

    This works by changing the module's class: ``layernorm_ext.LayerNorm`` adds no state
    to ``nn.LayerNorm``, only its ``forward``, so the object is already a complete
    ``layernorm_ext.LayerNorm`` (``torch.nn.utils.parametrize`` swaps classes the same way).

    Left alone: modules that already are ``layernorm_ext.LayerNorm``, and every other
    subclass of ``nn.LayerNorm``, whose ``forward`` or state may differ from
    ``nn.LayerNorm``'s (a parametrized LayerNorm is such a subclass too).

    Note that ``nn.TransformerEncoderLayer`` has a fast path for inference (eval mode,
    no autograd) that calls a native fused kernel with the LayerNorm parameters instead
    of calling the LayerNorm modules; there the swap changes nothing. Training and
    ``torch.no_grad()``-free evaluation call the modules, hence the fused kernels.

    Returns ``model``.
    """
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = LayerNorm
    return model


def replace_rmsnorm(model: nn.Module) -> nn.Module:
    """Makes every ``torch.nn.RMSNorm`` in ``model`` a :class:`layernorm_ext.RMSNorm`, in place.

    The RMSNorm counterpart of :func:`replace_layernorm`, with the same rules: modules whose
    type is exactly ``torch.nn.RMSNorm`` (``model`` itself included) change class and stay
    the same objects (same ``weight`` Parameter, settings, hooks, state_dict keys); other
    subclasses of ``nn.RMSNorm`` and modules that already are ``layernorm_ext.RMSNorm`` are
    left alone. LayerNorms are untouched (call both functions to swap both kinds).

    Returns ``model``.
    """
    for module in model.modules():
        if type(module) is nn.RMSNorm:
            module.__class__ = RMSNorm
    return model
