"""The normalised configuration of a multi-scale block (SPEC.md), with validation.

A :class:`BlockSpec` holds everything about a block that is not a tensor: one :class:`BranchSpec` per
branch (its pyramid level, channels, kernel size, whether it has a bias and a norm) and the block-wide
resize, activation and input-position settings. Modules build one in their constructor; the functional
entry and every backend read it. Constructor arguments are checked here, once, with messages that name
the argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Tuple, Union

DOWN_MODES = ("avg", "bilinear", "nearest")
UP_MODES = ("bilinear", "nearest")
ACTIVATIONS = ("relu", "silu", "gelu")
INPUT_POSITIONS = ("first", "last")
NORMS = ("batch",)
#: The projection's settings (SPEC.md, "The projection") other than ``out_channels``, with their defaults.
PROJECT_DEFAULTS = {"kernel_size": 1, "bias": False, "norm": "batch", "activation": "relu"}


@dataclasses.dataclass(frozen=True)
class BranchSpec:
    """One branch: its level (``factor`` or ``bins``), channels, kernel, bias and norm."""

    factor: int  # >= 1 for factor branches, 0 for bin branches
    bins: Tuple[int, int]  # (h, w) for bin branches, (0, 0) for factor branches
    out_channels: int
    kernel_size: int
    bias: bool
    norm: Optional[str]  # None or 'batch'

    @property
    def is_identity_level(self) -> bool:
        """True when the level is ``x`` itself (factor 1): no down- or up-resize."""
        return self.factor == 1

    def level_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (h, w) this branch works at for an input of ``height`` x ``width``."""
        if self.factor:
            return height // self.factor, width // self.factor
        return self.bins


@dataclasses.dataclass(frozen=True)
class ProjectSpec:
    """The block's optional projection: a ``kernel_size`` convolution of the concatenation to
    ``out_channels``, its bias, norm and activation (SPEC.md, "The projection")."""

    out_channels: int
    kernel_size: int
    bias: bool
    norm: Optional[str]  # None or 'batch'
    activation: Optional[str]

    def op_args(self) -> dict:
        return dict(project_activation=self.activation or "none")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Everything about a block that is not a tensor (see SPEC.md)."""

    in_channels: int
    branches: Tuple[BranchSpec, ...]
    down_mode: str
    up_mode: str
    align_corners: bool
    activation: Optional[str]
    input_position: Optional[str]
    project: Optional[ProjectSpec] = None

    @property
    def concat_channels(self) -> int:
        """Channels of the concatenation: every branch's, plus ``in_channels`` when ``x`` is part of it."""
        extra = self.in_channels if self.input_position else 0
        return sum(b.out_channels for b in self.branches) + extra

    @property
    def out_channels(self) -> int:
        """Channels of the block's output: the projection's, else the concatenation's."""
        return self.project.out_channels if self.project else self.concat_channels

    # The non-tensor operator arguments, in schema order (csrc/ops.cpp).
    def op_args(self) -> dict:
        return dict(
            factor=[b.factor for b in self.branches],
            bins=[v for b in self.branches for v in b.bins],
            down_mode=self.down_mode,
            up_mode=self.up_mode,
            align_corners=self.align_corners,
            activation=self.activation or "none",
            input_position=self.input_position or "none",
        )


def _per_branch(name: str, value: Any, count: int, scalar_types: tuple) -> list:
    """One value for every branch, or a sequence with exactly one per branch."""
    if isinstance(value, scalar_types) or value is None:
        return [value] * count
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(
                f"{name} must be one value or a sequence of {count} (one per branch), got {len(value)} values"
            )
        return list(value)
    raise TypeError(f"{name} must be one value or a sequence with one per branch, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple, allow_none: bool) -> Optional[str]:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _normalise_bins(bins: Any) -> list:
    if isinstance(bins, int) and not isinstance(bins, bool):
        bins = (bins,)
    if not isinstance(bins, Sequence) or isinstance(bins, str) or len(bins) == 0:
        raise ValueError(f"bins must be a non-empty sequence of ints or (h, w) pairs, got {bins!r}")
    out = []
    for i, b in enumerate(bins):
        if isinstance(b, Sequence) and not isinstance(b, str):
            if len(b) != 2:
                raise ValueError(f"bins[{i}] must be an int or an (h, w) pair, got {b!r}")
            out.append((_check_int(f"bins[{i}][0]", b[0], 1), _check_int(f"bins[{i}][1]", b[1], 1)))
        else:
            v = _check_int(f"bins[{i}]", b, 1)
            out.append((v, v))
    return out


def _normalise_scales(scales: Any) -> list:
    if isinstance(scales, int) and not isinstance(scales, bool):
        scales = (scales,)
    if not isinstance(scales, Sequence) or isinstance(scales, str) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty sequence of ints >= 1, got {scales!r}")
    return [_check_int(f"scales[{i}]", s, 1) for i, s in enumerate(scales)]


def make_project(project: Any) -> Optional[ProjectSpec]:
    """``None``, or a dict with ``out_channels`` (required) and any of :data:`PROJECT_DEFAULTS`' keys."""
    if project is None:
        return None
    if not isinstance(project, dict):
        raise TypeError(f"project must be None or a dict(out_channels=..., kernel_size=..., bias=..., norm=..., "
                        f"activation=...), got {type(project).__name__}")
    unknown = sorted(set(project) - set(PROJECT_DEFAULTS) - {"out_channels"}, key=str)
    if unknown:
        allowed = ", ".join(["out_channels", *PROJECT_DEFAULTS])
        raise ValueError(f"project has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
    if "out_channels" not in project:
        raise ValueError("project must give 'out_channels' (the projection's output channels)")
    p = {**PROJECT_DEFAULTS, **project}
    out_channels = _check_int("project['out_channels']", p["out_channels"], 1)
    k = _check_int("project['kernel_size']", p["kernel_size"], 1)
    if k % 2 == 0:
        raise ValueError(f"project['kernel_size'] must be odd (1, 3, 5, 7, ...), got {k}")
    if not isinstance(p["bias"], bool):
        raise TypeError(f"project['bias'] must be a bool, got {p['bias']!r}")
    norm = _check_choice("project['norm']", p["norm"], NORMS, allow_none=True)
    activation = _check_choice("project['activation']", p["activation"], ACTIVATIONS, allow_none=True)
    return ProjectSpec(out_channels, k, p["bias"], norm, activation)


def make_spec(
    in_channels: int,
    branch_channels: Union[int, Sequence[int]],
    *,
    scales: Optional[Sequence[int]] = None,
    bins: Optional[Sequence[Union[int, Tuple[int, int]]]] = None,
    kernel_size: Union[int, Sequence[int]],
    down_mode: str,
    up_mode: str,
    align_corners: bool,
    bias: Union[bool, Sequence[bool]],
    norm: Union[Optional[str], Sequence[Optional[str]]],
    activation: Optional[str],
    input_position: Optional[str],
    project: Optional[dict] = None,
) -> BlockSpec:
    """Validate constructor arguments and build the :class:`BlockSpec` (exactly one of scales / bins)."""
    in_channels = _check_int("in_channels", in_channels, 1)
    if (scales is None) == (bins is None):
        raise ValueError("exactly one of scales and bins must be given")
    if scales is not None:
        levels = [(s, (0, 0)) for s in _normalise_scales(scales)]
        down_mode = _check_choice("down_mode", down_mode, DOWN_MODES, allow_none=False)
    else:
        levels = [(0, b) for b in _normalise_bins(bins)]
        down_mode = "avg"  # bins always use adaptive average pooling
    count = len(levels)
    channels = _per_branch("branch_channels", branch_channels, count, (int,))
    kernels = _per_branch("kernel_size", kernel_size, count, (int,))
    biases = _per_branch("bias", bias, count, (bool,))
    norms = _per_branch("norm", norm, count, (str,))
    up_mode = _check_choice("up_mode", up_mode, UP_MODES, allow_none=False)
    activation = _check_choice("activation", activation, ACTIVATIONS, allow_none=True)
    input_position = _check_choice("input_position", input_position, INPUT_POSITIONS, allow_none=True)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    branches = []
    for i, ((factor, level_bins), cb, k, b, n) in enumerate(zip(levels, channels, kernels, biases, norms)):
        cb = _check_int(f"branch_channels[{i}]", cb, 1)
        k = _check_int(f"kernel_size[{i}]", k, 1)
        if k % 2 == 0:
            raise ValueError(f"kernel_size[{i}] must be odd (1, 3, 5, 7, ...), got {k}")
        if not isinstance(b, bool):
            raise TypeError(f"bias[{i}] must be a bool, got {b!r}")
        n = _check_choice(f"norm[{i}]", n, NORMS, allow_none=True)
        branches.append(BranchSpec(factor, level_bins, cb, k, b, n))
    return BlockSpec(in_channels, tuple(branches), down_mode, up_mode, align_corners, activation, input_position,
                     make_project(project))
