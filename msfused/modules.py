"""The fused drop-in modules and ``convert`` / ``revert`` between them and their naive twins."""

from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional

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
    why = unfusable_reason(block.spec, block.branches, now=False)
    if why is not None:
        raise ValueError(
            f"msfused.convert: {path or type(block).__name__}: {why}. Convert before replacing it (or keep this block naive)."
        )


def _swap(model: nn.Module, mapping: dict, path: str, check: bool, done: list) -> nn.Module:
    target = mapping.get(type(model))
    if target is not None:
        if check:
            _check_convertible(path, model)
        done.append(path)
        return target._sharing(model)
    for name, child in list(model.named_children()):
        new = _swap(child, mapping, f"{path}.{name}" if path else name, check, done)
        if new is not child:
            setattr(model, name, new)
    return model


class ConvertRecord(NamedTuple):
    """One module :func:`convert` looked at: its path in the model ('' for the model itself), what it is
    (``'msfused NaivePyramidPooling'``, ``'mmseg PPM'``, ...), and None if converted, else why not."""

    path: str
    what: str
    reason: Optional[str]

    @property
    def converted(self) -> bool:
        return self.reason is None


class ConvertReport(List[ConvertRecord]):
    """What :func:`convert` did, one :class:`ConvertRecord` per module it knows; ``model`` is the result
    (a naive block given itself is replaced by its fused twin)."""

    model: nn.Module

    def summary(self) -> str:
        if not self:
            return ("msfused.convert: nothing to convert in this " + type(self.model).__name__ + ": no msfused naive "
                    "block and no third-party pyramid block msfused knows (README: 'Your existing model'; "
                    "msfused.fuse traces a hand-written one)")
        done = [r for r in self if r.converted]
        lines = [f"msfused.convert: {len(done)} of {len(self)} known blocks converted"]
        for r in self:
            lines.append(f"  {r.path or '(the model)'}: {r.what}: " + ("converted" if r.converted else
                                                                      f"not converted, {r.reason}"))
        return "\n".join(lines)


def convert(model: nn.Module, report: bool = False):
    """Makes the multi-scale blocks inside ``model`` run fused, in place, parameters and buffers shared.

    * msfused's ``NaiveMultiScaleBlock`` / ``NaivePyramidPooling`` are replaced by their fused twins; one
      whose conv or norm was replaced by something the kernels do not compute raises ``ValueError``.
    * Known third-party modules (``msfused.thirdparty.TABLE``: smp's PSPModule and ASPPPooling, mmseg's PPM,
      PSPHead and UPerHead, transformers' UperNet / BEiT / Data2Vec pyramid pooling, torchvision's
      ASPPPooling, ...) keep their class, submodules, parameters, buffers, ``state_dict`` keys and hooks;
      only the computation of the library's method changes. One that does not fit SPEC.md (another norm,
      a dilated conv, a subclass overriding the method) is left as it is and reported.

    Warns with a summary of what was converted and what not (or that nothing was found). Returns ``model``
    (the fused block when ``model`` is itself a naive block), or with ``report=True`` a
    :class:`ConvertReport` (a list of ``(path, what, reason)``, ``reason`` None when converted; its
    ``model`` attribute is the result) and no warning."""
    from . import thirdparty

    records = ConvertReport()
    naive = {NaiveMultiScaleBlock, NaivePyramidPooling, MultiScaleBlock, PyramidPooling}
    for path, module in model.named_modules():
        if type(module) in naive or any(type(m) in naive for m in _ancestors(model, path)):
            continue
        found = thirdparty.convert_module(module)
        if found is not None:
            records.append(ConvertRecord(path, found[0], found[1]))
    twins: list = []
    result = _swap(model, _TO_FUSED, "", check=True, done=twins)
    records.extend(ConvertRecord(p, f"msfused {_TO_NAIVE[type(result.get_submodule(p))].__name__}", None)
                   for p in twins)
    records.model = result
    if report:
        return records
    warnings.warn(records.summary(), UserWarning, stacklevel=2)
    return result


def _ancestors(model: nn.Module, path: str) -> list:
    names = path.split(".") if path else []
    out, m = [], model
    for name in names[:-1]:
        m = m._modules[name]
        out.append(m)
    return out


def revert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: fused blocks back to their naive twins and third-party modules back
    to their library's computation, in place, parameters shared."""
    from . import thirdparty

    for module in model.modules():
        thirdparty.unfuse(module)
    return _swap(model, _TO_NAIVE, "", check=False, done=[])
