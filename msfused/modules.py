"""The fused drop-in modules and ``convert`` / ``revert`` between them and their naive twins."""

from __future__ import annotations

import torch
from torch import nn

from .functional import multi_scale, unfusable_reason
from .naive import _BLOCK_ARGS_DOC, NaiveMultiScaleBlock, NaivePyramidPooling, _Block, _MultiScaleBase, _PyramidPoolingBase


class MultiScaleBlock(_MultiScaleBase):
    __doc__ = (
        """The multi-scale block (factor pyramid), computed in fused launches.

    For each scale ``s``: ``x`` resized to (H // s, W // s), convolution, norm, activation, resized back
    to (H, W); the output is the concatenation with ``x`` (SPEC.md). Same constructor, ``state_dict`` and
    numbers as :class:`msfused.NaiveMultiScaleBlock`; the backend follows :func:`msfused.use_backend`.

        scales: integer factors >= 1, one branch each (1 = full resolution).
        down_mode: ``'avg'`` (avg_pool2d, floor), ``'bilinear'`` or ``'nearest'``.
"""
        + _BLOCK_ARGS_DOC
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multi_scale(x, self.spec, self.branches)


class PyramidPooling(_PyramidPoolingBase):
    __doc__ = (
        """PSPNet's pyramid pooling module, computed in fused launches.

    For each bin ``(h, w)``: adaptive average pooling, convolution, norm, activation, resized back to
    (H, W); the output is the concatenation with ``x`` (SPEC.md). Same constructor, ``state_dict`` and
    numbers as :class:`msfused.NaivePyramidPooling`; the backend follows :func:`msfused.use_backend`.

        bins: each an int or an ``(h, w)`` pair; bins need not divide the map.
"""
        + _BLOCK_ARGS_DOC
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multi_scale(x, self.spec, self.branches)


_TO_FUSED = {NaiveMultiScaleBlock: MultiScaleBlock, NaivePyramidPooling: PyramidPooling}
_TO_NAIVE = {fused: naive for naive, fused in _TO_FUSED.items()}


def _check_convertible(path: str, block: _Block) -> None:
    """Refuses blocks whose parts were replaced by something the fused kernels do not compute."""
    why = unfusable_reason(block.spec, block.branches)
    if why is not None:
        raise ValueError(
            f"msfused.convert: {path}: {why}. Convert before nn.SyncBatchNorm.convert_sync_batchnorm (or any "
            "other replacement), or keep this block naive."
        )


def _swap(model: nn.Module, mapping: dict, path: str, check: bool) -> nn.Module:
    target = mapping.get(type(model))
    if target is not None:
        if check:
            _check_convertible(path, model)
        return target._sharing(model)
    for name, child in list(model.named_children()):
        new = _swap(child, mapping, f"{path}.{name}", check)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``NaiveMultiScaleBlock`` / ``NaivePyramidPooling`` inside ``model`` by its fused twin,
    in place, sharing the parameters and buffers (no copies). Returns ``model`` (or the fused block when
    ``model`` itself is a naive block). Raises ``ValueError`` for a block whose conv or norm was replaced by
    something the fused kernels do not compute (``nn.SyncBatchNorm``, a strided conv, ...)."""
    return _swap(model, _TO_FUSED, "model", check=True)


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: fused blocks back to their naive twins, in place, parameters shared."""
    return _swap(model, _TO_NAIVE, "model", check=False)
