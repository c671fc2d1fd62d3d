"""The two blocks' shared structure and their naive twins in plain PyTorch.

``_MultiScaleBase`` and ``_PyramidPoolingBase`` own the constructors and the parameters
(``branches[i].conv``, ``branches[i].norm``); the naive twins add the reference ``forward`` and the fused
modules (:mod:`msfused.modules`) the fused one, so ``state_dict`` keys and shapes are identical by
construction.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .reference import reference_forward
from .spec import BlockSpec, ProjectSpec, make_spec


def conv_and_norm(part: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """A branch's or projection's ``conv`` and ``norm`` (None where missing), read from its registered
    submodules: the per-call checks read them for every part, and ``nn.Module.__getattr__``'s fallback costs
    ~0.6 us a read on a small CPU."""
    modules = part._modules
    return modules.get("conv"), modules.get("norm")


class Branch(nn.Module):
    """One pyramid branch's parameters: ``conv`` (an ``nn.Conv2d``) and ``norm`` (``nn.BatchNorm2d`` or
    ``nn.Identity``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, norm: Optional[str]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm == "batch" else nn.Identity()


class Projection(nn.Module):
    """The block's projection (SPEC.md): ``conv`` (``nn.Conv2d(C_out, P, k, padding=k // 2)``) and ``norm``
    (``nn.BatchNorm2d`` or ``nn.Identity``); its activation is ``spec.project.activation``."""

    def __init__(self, in_channels: int, p: ProjectSpec):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, p.out_channels, p.kernel_size, padding=p.kernel_size // 2, bias=p.bias)
        self.norm = nn.BatchNorm2d(p.out_channels) if p.norm == "batch" else nn.Identity()


class _Block(nn.Module):
    """Holds ``spec`` (a :class:`~msfused.spec.BlockSpec`), ``branches`` and ``project`` (a
    :class:`Projection` or None); nothing else."""

    spec: BlockSpec

    def _build(self, spec: BlockSpec) -> None:
        self.spec = spec
        self.branches = nn.ModuleList(
            Branch(spec.in_channels, b.out_channels, b.kernel_size, b.bias, b.norm) for b in spec.branches
        )
        self.project = Projection(spec.concat_channels, spec.project) if spec.project else None

    @property
    def out_channels(self) -> int:
        """Channels of the output: the projection's, else every branch's plus ``in_channels`` when ``x`` is
        part of it."""
        return self.spec.out_channels

    @classmethod
    def _sharing(cls, other: "_Block") -> "_Block":
        """A module of this class that shares ``other``'s configuration and parameters (no copies)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.spec = other.spec
        module.branches = other.branches
        module.project = other.project
        module.train(other.training)
        return module

    def extra_repr(self) -> str:
        s = self.spec
        if s.branches[0].factor:
            levels = f"scales={tuple(b.factor for b in s.branches)}, down_mode={s.down_mode!r}"
        else:
            levels = f"bins={tuple(b.bins for b in s.branches)}"
        per = lambda attr: tuple(getattr(b, attr) for b in s.branches)  # noqa: E731
        return (
            f"in_channels={s.in_channels}, branch_channels={per('out_channels')}, {levels}, "
            f"kernel_size={per('kernel_size')}, up_mode={s.up_mode!r}, align_corners={s.align_corners}, "
            f"bias={per('bias')}, norm={per('norm')}, activation={s.activation!r}, "
            f"input_position={s.input_position!r}, out_channels={s.out_channels}"
            + (f", project={dataclasses.asdict(s.project)}" if s.project else "")
        )


class _MultiScaleBase(_Block):
    def __init__(
        self,
        in_channels: int,
        branch_channels: Union[int, Sequence[int]],
        scales: Sequence[int] = (1, 2, 4),
        kernel_size: Union[int, Sequence[int]] = 3,
        down_mode: str = "avg",
        up_mode: str = "bilinear",
        align_corners: bool = False,
        bias: Union[bool, Sequence[bool]] = True,
        norm: Union[Optional[str], Sequence[Optional[str]]] = None,
        activation: Optional[str] = "relu",
        input_position: Optional[str] = "first",
        project: Optional[dict] = None,
    ):
        super().__init__()
        self._build(
            make_spec(
                in_channels, branch_channels, scales=scales, kernel_size=kernel_size, down_mode=down_mode,
                up_mode=up_mode, align_corners=align_corners, bias=bias, norm=norm, activation=activation,
                input_position=input_position, project=project,
            )
        )


class _PyramidPoolingBase(_Block):
    def __init__(
        self,
        in_channels: int,
        branch_channels: Union[int, Sequence[int]],
        bins: Sequence[Union[int, Tuple[int, int]]] = (1, 2, 3, 6),
        kernel_size: Union[int, Sequence[int]] = 1,
        up_mode: str = "bilinear",
        align_corners: bool = False,
        bias: Union[bool, Sequence[bool]] = False,
        norm: Union[Optional[str], Sequence[Optional[str]]] = "batch",
        activation: Optional[str] = "relu",
        input_position: Optional[str] = "first",
        project: Optional[dict] = None,
    ):
        super().__init__()
        self._build(
            make_spec(
                in_channels, branch_channels, bins=bins, kernel_size=kernel_size, down_mode="avg",
                up_mode=up_mode, align_corners=align_corners, bias=bias, norm=norm, activation=activation,
                input_position=input_position, project=project,
            )
        )


_BLOCK_ARGS_DOC = """
    Args:
        in_channels: channels ``C`` of the input ``x`` (N, C, H, W).
        branch_channels: output channels of each branch's convolution: one int, or one per branch.
        kernel_size: odd convolution kernel size (stride 1, padding ``k // 2``): one, or one per branch.
        up_mode: ``'bilinear'`` or ``'nearest'``: how each branch is resized back to (H, W).
        align_corners: for every bilinear resize of the block (down and up).
        bias: whether each branch's convolution has a bias: one bool, or one per branch.
        norm: ``None`` or ``'batch'`` (an ``nn.BatchNorm2d`` after the convolution): one, or one per branch.
        activation: ``'relu'``, ``'silu'``, ``'gelu'`` (exact erf form) or ``None``.
        input_position: ``'first'``, ``'last'`` or ``None``: where ``x`` itself goes in the output.
        project: ``None``, or ``dict(out_channels=P, kernel_size=1, bias=False, norm='batch',
            activation='relu')`` (``out_channels`` required, the other keys default to these): the
            convolution (+ norm + activation) that consumes the concatenation; the output is then
            (N, P, H, W) (SPEC.md, "The projection").

    Parameters live in ``branches[i].conv`` (``nn.Conv2d``) and ``branches[i].norm`` (``nn.BatchNorm2d``
    or ``nn.Identity``), and ``project.conv`` / ``project.norm`` with a projection; ``out_channels`` is the
    output's channel count.
"""


class NaiveMultiScaleBlock(_MultiScaleBase):
    __doc__ = (
        """The multi-scale block (factor pyramid) written as a chain of PyTorch calls: the baseline.

    For each scale ``s``: ``x`` resized to (H // s, W // s) (``down_mode`` ``'avg'``, ``'bilinear'`` or
    ``'nearest'``), convolution, norm, activation, resized back; then ``torch.cat`` with ``x``.
    Same constructor and ``state_dict`` as :class:`msfused.MultiScaleBlock`.

        scales: integer factors >= 1, one branch each (1 = full resolution).
        down_mode: ``'avg'`` (avg_pool2d, floor), ``'bilinear'`` or ``'nearest'``.
"""
        + _BLOCK_ARGS_DOC
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .functional import check_input

        check_input(x, self.spec, self.branches, self.project)
        return reference_forward(x, self.spec, self.branches, self.project)


class NaivePyramidPooling(_PyramidPoolingBase):
    __doc__ = (
        """PSPNet's pyramid pooling module written as a chain of PyTorch calls: the baseline.

    For each bin ``(h, w)``: ``adaptive_avg_pool2d(x, (h, w))``, convolution, norm, activation, resized
    back to (H, W); then ``torch.cat`` with ``x``. Same constructor and ``state_dict`` as
    :class:`msfused.PyramidPooling`.

        bins: each an int or an ``(h, w)`` pair; bins need not divide the map.
"""
        + _BLOCK_ARGS_DOC
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .functional import check_input

        check_input(x, self.spec, self.branches, self.project)
        return reference_forward(x, self.spec, self.branches, self.project)
