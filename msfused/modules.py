"""The fused drop-in modules and ``convert`` / ``revert`` between them and their naive twins."""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from .functional import multi_scale, unfusable_reason
from .naive import (_BLOCK_ARGS_DOC, NaiveMultiScaleBlock, NaivePyramidPooling, Projection, _Block, _MultiScaleBase,
                    _PyramidPoolingBase)
from .spec import ProjectSpec


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
        return multi_scale(x, self.spec, self.branches, self.project)


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
        return multi_scale(x, self.spec, self.branches, self.project)


_TO_FUSED = {NaiveMultiScaleBlock: MultiScaleBlock, NaivePyramidPooling: PyramidPooling}
_TO_NAIVE = {fused: naive for naive, fused in _TO_FUSED.items()}


def _check_convertible(path: str, block: _Block) -> None:
    """Refuses blocks whose parts were replaced by something the fused kernels do not compute."""
    why = unfusable_reason(block.spec, block.branches, now=False, project=block.project)
    if why is not None:
        raise ValueError(
            f"msfused.convert: {path or type(block).__name__}: {why}. Convert before replacing it (or keep this block naive)."
        )


_FOLDABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}


def _projection_after(block: _Block, rest: list) -> Optional[tuple]:
    """(ProjectSpec, conv, norm, count) when the modules ``rest`` that follow a block without a projection
    in an ``nn.Sequential`` start with a plain conv of its output (+ ``nn.BatchNorm2d`` + activation) that the
    fused kernels compute as its projection (SPEC.md: zero padding k // 2, stride 1, dilation 1, groups 1);
    ``count`` is how many modules that takes. None otherwise."""
    if block.project is not None or not rest:
        return None
    conv = rest[0]
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
    if type(conv) is not nn.Conv2d or conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1) or \
            conv.padding != (k // 2, k // 2) or conv.dilation != (1, 1) or conv.groups != 1 or \
            conv.padding_mode != "zeros" or conv.in_channels != block.spec.concat_channels:
        return None
    norm, count = nn.Identity(), 1
    if len(rest) > count and type(rest[count]) is nn.BatchNorm2d and rest[count].num_features == conv.out_channels:
        norm, count = rest[count], count + 1
    activation = None
    if len(rest) > count and type(rest[count]) in _FOLDABLE_ACTIVATIONS and \
            getattr(rest[count], "approximate", "none") == "none":
        activation, count = _FOLDABLE_ACTIVATIONS[type(rest[count])], count + 1
    spec = ProjectSpec(conv.out_channels, k, conv.bias is not None, "batch" if isinstance(norm, nn.BatchNorm2d) else None,
                       activation)
    return spec, conv, norm, count


def _fold_projections(seq: nn.Sequential) -> None:
    """In ``seq``, a naive block followed directly by a plain conv (+ BatchNorm2d + activation) becomes a naive
    block with that projection (the modules themselves, shared); the folded modules' places hold
    ``nn.Identity`` so that the other indices (and their ``state_dict`` keys) stay."""
    children = list(seq._modules.items())
    for i, (name, child) in enumerate(children):
        if type(child) not in _TO_FUSED:
            continue
        found = _projection_after(child, [m for _, m in children[i + 1:]])
        if found is None:
            continue
        spec, conv, norm, count = found
        block = type(child)._sharing(child)
        block.spec = dataclasses.replace(child.spec, project=spec)
        project = Projection.__new__(Projection)
        nn.Module.__init__(project)
        project.conv, project.norm = conv, norm
        project.train(conv.training)
        block.project = project
        seq._modules[name] = block
        for later, _ in children[i + 1:i + 1 + count]:
            seq._modules[later] = nn.Identity()
        children = list(seq._modules.items())


def _swap(model: nn.Module, mapping: dict, path: str, check: bool, done: list, fold: bool = False) -> nn.Module:
    target = mapping.get(type(model))
    if target is not None:
        if check:
            _check_convertible(path, model)
        done.append(path)
        return target._sharing(model)
    if fold and isinstance(model, nn.Sequential):
        _fold_projections(model)
    for name, child in list(model.named_children()):
        new = _swap(child, mapping, f"{path}.{name}" if path else name, check, done, fold)
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


def convert(model: nn.Module, report: bool = False, fold_projections: bool = False):
    """Makes the multi-scale blocks inside ``model`` run fused, in place, parameters and buffers shared.

    * msfused's ``NaiveMultiScaleBlock`` / ``NaivePyramidPooling`` are replaced by their fused twins; one
      whose conv or norm was replaced by something the kernels do not compute raises ``ValueError``.
    * Known third-party modules (``msfused.thirdparty.TABLE``: smp's PSPModule and ASPPPooling, mmseg's PPM,
      PSPHead and UPerHead, transformers' UperNet / BEiT / Data2Vec pyramid pooling, torchvision's
      ASPPPooling, ...) keep their class, submodules, parameters, buffers, ``state_dict`` keys and hooks;
      only the computation of the library's method changes. One that does not fit SPEC.md (another norm,
      a dilated conv, a subclass overriding the method) is left as it is and reported.
    * With ``fold_projections=True``, inside an ``nn.Sequential``, a naive block followed directly by a plain
      ``nn.Conv2d`` of its output (odd k, padding k // 2, stride 1; + ``nn.BatchNorm2d`` + ``nn.ReLU`` /
      ``nn.SiLU`` / ``nn.GELU``) becomes the fused block with that projection (the concatenation is then
      never built); the conv, norm and activation's places in the Sequential hold ``nn.Identity``, and the
      conv and norm move to ``block.project.conv`` / ``.norm`` (the same modules). Opt-in because it renames
      those modules' ``state_dict`` keys (``'2.weight'`` becomes ``'1.project.conv.weight'``): a checkpoint
      saved before folding then needs its keys mapped.

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
    result = _swap(model, _TO_FUSED, "", check=True, done=twins, fold=fold_projections)
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
    to their library's computation, in place, parameters shared (a folded projection stays the naive
    block's projection: the same numbers)."""
    from . import thirdparty

    for module in model.modules():
        thirdparty.unfuse(module)
    return _swap(model, _TO_NAIVE, "", check=False, done=[])
