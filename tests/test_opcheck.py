"""``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch) on both operators,
with the arguments the module really passes (built here from a block, as msfused.functional does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .conftest import Case, build_case, case_ids, make_input

FORWARD = torch.ops.msfused.multi_scale_forward.default
BACKWARD = torch.ops.msfused.multi_scale_backward.default


def op_arguments(block: nn.Module, x: torch.Tensor, requires_grad: bool) -> tuple:
    """(args, kwargs) of multi_scale_forward for ``block`` on ``x``: eval-mode norms folded into scale and
    shift, batch-statistics norms passing their affine parameters (csrc/ops.cpp)."""
    weight, bias, scale, shift, batch_stats, eps = [], [], [], [], [], []
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(requires_grad)  # noqa: E731
    for branch in block.branches:
        weight.append(leaf(branch.conv.weight))
        bias.append(leaf(branch.conv.bias))
        norm = branch.norm
        if isinstance(norm, nn.BatchNorm2d) and (norm.training or norm.running_mean is None):
            scale.append(leaf(norm.weight))
            shift.append(leaf(norm.bias))
            batch_stats.append(True)
        elif isinstance(norm, nn.BatchNorm2d):
            s = torch.rsqrt(norm.running_var + norm.eps) * norm.weight.detach()
            scale.append(leaf(s))
            shift.append(leaf(norm.bias.detach() - norm.running_mean * s))
            batch_stats.append(False)
        else:
            scale.append(None)
            shift.append(None)
            batch_stats.append(False)
        eps.append(float(getattr(norm, "eps", 0.0)))
    spec = block.spec
    op = spec.op_args()
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)
    args = (x, weight, bias, scale, shift, batch_stats, eps)
    return args, op


OP_CASES = [
    Case("ms", dict(scales=(1, 2, 3), down_mode="avg", norm="batch"), (2, 3, 9, 7), train=False, label="op"),
    Case("ms", dict(scales=(1, 2), down_mode="bilinear", align_corners=True, norm="batch", activation="gelu",
                    input_position="last"), (2, 4, 7, 8), train=True, label="op"),
    Case("ms", dict(scales=(1, 4), down_mode="nearest", up_mode="nearest", activation="silu", input_position=None,
                    bias=False), (2, 3, 9, 8), layout="channels_last", label="op"),
    Case("psp", dict(bins=(1, 2, 3, 6), bias=(True, False, False, False), norm=(None, "batch", "batch", "batch"),
                     align_corners=True, input_position="last"), (3, 5, 13, 11), train=True,
         layout="channels_last", label="op_psp_smp"),
    Case("psp", dict(bins=((2, 5), 3), kernel_size=3, activation=None), (2, 3, 7, 9), train=False,
         dtype=torch.float32, label="op"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=case_ids(OP_CASES))
def test_opcheck_forward(case):
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout)
    args, kwargs = op_arguments(fused, x, requires_grad=True)
    torch.library.opcheck(FORWARD, args, kwargs)
    # And without anything requiring grad.
    args, kwargs = op_arguments(fused, x, requires_grad=False)
    torch.library.opcheck(FORWARD, args, kwargs)


@pytest.mark.parametrize("output_mask", [(True, True), (False, True), (True, False)],
                         ids=["grad_x+w", "grad_w", "grad_x"])
@pytest.mark.parametrize("case", OP_CASES, ids=case_ids(OP_CASES))
def test_opcheck_backward(case, output_mask):
    _, fused = build_case(case)
    x = make_input(case.shape, case.dtype, case.layout)
    (x, weight, bias, scale, shift, batch_stats, eps), kw = op_arguments(fused, x, requires_grad=False)
    out, level, pre, mean, var = FORWARD(x, weight, bias, scale, shift, batch_stats, eps, **kw)
    grad_out = torch.randn_like(out)
    args = (grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps)
    kwargs = dict(kw, output_mask=list(output_mask))
    torch.library.opcheck(BACKWARD, args, kwargs)
    # The gradients asked for are there, the others are empty.
    grad_x, grad_weight, grad_bias, grad_scale, grad_shift = BACKWARD(*args, **kwargs)
    assert (grad_x.shape == x.shape) if output_mask[0] else grad_x.numel() == 0
    for g, w in zip(grad_weight, weight):
        assert (g.shape == w.shape) if output_mask[1] else g.numel() == 0
    for g, w in zip(grad_bias, weight):
        assert g.shape == (w.shape[0],)
    for gs, s in zip(grad_scale, scale):
        assert (gs.shape == s.shape) if s is not None else gs.numel() == 0
    for gs, s in zip(grad_shift, shift):
        assert (gs.shape == s.shape) if s is not None else gs.numel() == 0


def test_forward_outputs_match_schema_description():
    """level is empty for factor 1, pre has the level's size, mean/var have Cb entries only with batch stats;
    the forward does not mutate its inputs."""
    case = Case("ms", dict(scales=(1, 2, 3), norm=("batch", None, "batch"), branch_channels=(2, 3, 4)), (2, 3, 9, 7),
                train=True)
    _, fused = build_case(case)
    x = make_input(case.shape)
    args, kw = op_arguments(fused, x, requires_grad=False)
    before = [t.clone() if isinstance(t, torch.Tensor) else
              [u.clone() if u is not None else None for u in t] if isinstance(t, list) and t and
              isinstance(t[0], (torch.Tensor, type(None))) else t for t in args]
    out, level, pre, mean, var = FORWARD(*args, **kw)
    assert out.shape == (2, 3 + 9, 9, 7)
    assert level[0].numel() == 0 and level[1].shape == (2, 3, 4, 3) and level[2].shape == (2, 3, 3, 2)
    assert [p.shape for p in pre] == [(2, 2, 9, 7), (2, 3, 4, 3), (2, 4, 3, 2)]
    assert [m.numel() for m in mean] == [2, 0, 4] and [v.numel() for v in var] == [2, 0, 4]
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, list) and a and isinstance(a[0], (torch.Tensor, type(None))):
            for u, v in zip(a, b):
                assert (u is None and v is None) or torch.equal(u, v)
