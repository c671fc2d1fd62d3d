"""The reference composition of SPEC.md, in plain PyTorch.

This is the definition every fused backend is checked against, written the way a user writes the block:
resize ``x`` to each level, convolve, norm, activate, resize back, ``torch.cat``. The naive modules run
it, and so does backend ``'reference'``: there is one copy of it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .spec import BlockSpec

_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, None: None}


def down_resize(x: torch.Tensor, spec: BlockSpec, branch_index: int) -> torch.Tensor:
    """``x`` brought to the level of branch ``branch_index``."""
    b = spec.branches[branch_index]
    if b.factor == 1:
        return x
    if not b.factor:
        return F.adaptive_avg_pool2d(x, b.bins)
    if spec.down_mode == "avg":
        return F.avg_pool2d(x, kernel_size=b.factor, stride=b.factor)
    size = b.level_size(x.shape[-2], x.shape[-1])
    if spec.down_mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=spec.align_corners)
    return F.interpolate(x, size=size, mode="nearest")


def up_resize(a: torch.Tensor, spec: BlockSpec, size: Sequence[int]) -> torch.Tensor:
    """A branch's activation brought back to the input's ``size``."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    if spec.up_mode == "bilinear":
        return F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=spec.align_corners)
    return F.interpolate(a, size=tuple(size), mode="nearest")


def reference_forward(x: torch.Tensor, spec: BlockSpec, branches: nn.ModuleList,
                      project: Optional[nn.Module] = None) -> torch.Tensor:
    """SPEC.md's composition; each branch's norm is called as the module itself (running stats included).
    With a projection (``project.conv``, ``project.norm``), the concatenation is built and then convolved,
    as a user's code does."""
    size = x.shape[-2:]
    activation = _ACTIVATIONS[spec.activation]
    outs = []
    for i, branch in enumerate(branches):
        a = branch.norm(branch.conv(down_resize(x, spec, i)))
        if activation is not None:
            a = activation(a)
        outs.append(up_resize(a, spec, size))
    if spec.input_position == "first":
        outs.insert(0, x)
    elif spec.input_position == "last":
        outs.append(x)
    cat = torch.cat(outs, 1)
    if project is None:
        return cat
    y = project.norm(project.conv(cat))
    activation = _ACTIVATIONS[spec.project.activation]
    return y if activation is None else activation(y)
