"""The Triton operators: ``msfused::multi_scale_forward_triton`` and ``msfused::multi_scale_backward_triton``.

Same arguments and results as the C++ operators (``csrc/ops.cpp``), except that an absent per-branch
bias, scale or shift is an empty tensor rather than None: autograd registered through ``torch.library``
tracks the tensors of ``Tensor[]`` arguments only (a list holding a None is one opaque argument), so
this keeps every present bias and norm parameter differentiable. Defined with
``torch.library.triton_op`` so that ``torch.compile`` sees one node and can look inside at the Triton
kernels; the shape-only (fake) kernels are the C++ operators' own (``msfused/_ops.py``), and autograd is
registered here: the backward operator, asked only for the gradients some input needs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ops
from . import launch

_FORWARD = "msfused::multi_scale_forward_triton"
_BACKWARD = "msfused::multi_scale_backward_triton"
_INFERENCE = "msfused::multi_scale_inference_triton"


def _opt(tensors: List[Tensor]) -> List[Optional[Tensor]]:
    """Empty tensors mark absent per-branch tensors."""
    return [t if t.numel() else None for t in tensors]


_EMPTY: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}


def _empty_like(like: Tensor) -> Tensor:
    """An empty tensor of ``like``'s dtype and device: one per (dtype, device) outside a trace (no host op
    per call; created outside inference mode, so that any call may save it for backward)."""
    if torch.compiler.is_compiling() or isinstance(like, torch._subclasses.FakeTensor) or \
            torch._guards.detect_fake_mode() is not None:
        return like.new_empty((0,))
    key = (like.dtype, like.device)
    empty = _EMPTY.get(key)
    if empty is None:
        with torch.inference_mode(False):
            empty = _EMPTY.setdefault(key, torch.empty((0,), dtype=like.dtype, device=like.device))
    return empty


def absent_as_empty(tensors: List[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    """The operator's form of a per-branch optional tensor list: None becomes an empty tensor."""
    return [t if t is not None else _empty_like(like) for t in tensors]


@torch.library.triton_op(_FORWARD, mutates_args=())
def multi_scale_forward_triton(
    x: Tensor, weight: List[Tensor], bias: List[Tensor], scale: List[Tensor],
    shift: List[Tensor], batch_stats: List[bool], eps: List[float], factor: List[int], bins: List[int],
    down_mode: str, up_mode: str, align_corners: bool, activation: str, input_position: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """The whole block (SPEC.md) in Triton kernels; see ``msfused::multi_scale_forward`` for the arguments."""
    return launch.forward(x, weight, _opt(bias), _opt(scale), _opt(shift), batch_stats, eps, factor, bins, down_mode, up_mode,
                          align_corners, activation, input_position)


@torch.library.triton_op(_BACKWARD, mutates_args=())
def multi_scale_backward_triton(
    grad_out: Tensor, x: Tensor, weight: List[Tensor], scale: List[Tensor], shift: List[Tensor],
    level: List[Tensor], pre: List[Tensor], mean: List[Tensor], var: List[Tensor], batch_stats: List[bool],
    eps: List[float], factor: List[int], bins: List[int], down_mode: str, up_mode: str, align_corners: bool,
    activation: str, input_position: str, output_mask: List[bool],
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Gradients of the block; see ``msfused::multi_scale_backward`` for the arguments."""
    return launch.backward(grad_out, x, weight, _opt(scale), _opt(shift), level, pre, mean, var, batch_stats, eps, factor, bins,
                           down_mode, up_mode, align_corners, activation, input_position, output_mask)


@torch.library.triton_op(_INFERENCE, mutates_args=())
def multi_scale_inference_triton(
    x: Tensor, weight: List[Tensor], bias: List[Tensor], scale: List[Tensor], shift: List[Tensor], factor: List[int],
    bins: List[int], down_mode: str, up_mode: str, align_corners: bool, activation: str, input_position: str,
) -> Tensor:
    """The block's output when no gradient is needed and every norm is folded into scale / shift (or
    absent): each branch's down-resize, convolution, epilogue and up-resize in one launch, nothing saved."""
    return launch.inference(x, weight, _opt(bias), _opt(scale), _opt(shift), factor, bins, down_mode, up_mode,
                            align_corners, activation, input_position)


@multi_scale_inference_triton.register_fake
def _inference_fake(x, weight, bias, scale, shift, factor, bins, down_mode, up_mode, align_corners, activation,
                    input_position):
    n = len(weight)
    return _ops.multi_scale_forward_fake(x, weight, _opt(bias), _opt(scale), _opt(shift), [False] * n, [0.0] * n,
                                         factor, bins, down_mode, up_mode, align_corners, activation,
                                         input_position)[0]


@multi_scale_forward_triton.register_fake
def _forward_fake(x, weight, bias, scale, shift, *config):
    return _ops.multi_scale_forward_fake(x, weight, _opt(bias), _opt(scale), _opt(shift), *config)


@multi_scale_backward_triton.register_fake
def _backward_fake(grad_out, x, weight, scale, shift, *rest):
    return _ops.multi_scale_backward_fake(grad_out, x, weight, _opt(scale), _opt(shift), *rest)


def _no_grads(config) -> tuple:
    """None for every non-tensor argument (a list of non-tensors is one argument to autograd)."""
    return (None,) * len(config)


def _setup_context(ctx, inputs, output):
    # Only the block's output has a gradient (the other outputs are what backward needs): autograd passes None
    # for theirs instead of a zero tensor of each one's shape (an allocation and a fill apiece, per step).
    ctx.set_materialize_grads(False)
    x, weight, bias, scale, shift, *config = inputs
    _out, level, pre, mean, var = output
    ctx.config = config
    ctx.B = len(weight)
    ctx.has = tuple([t.numel() > 0 for t in ts] for ts in (bias, scale, shift))
    ctx.save_for_backward(x, *weight, *scale, *shift, *level, *pre, *mean, *var)


def _backward(ctx, grad_out, _grad_level, _grad_pre, _grad_mean, _grad_var):
    if grad_out is None:  # (only the saved outputs reached the loss: they carry no gradient to the inputs)
        return (None,) + tuple([None] * ctx.B for _ in range(4)) + _no_grads(ctx.config)
    B = ctx.B
    saved = list(ctx.saved_tensors)
    if torch.is_grad_enabled() and (grad_out.requires_grad or any(t.requires_grad for t in saved)):
        raise RuntimeError(
            "msfused: second-order gradients through the multi-scale block are not supported "
            "(backward with create_graph=True)"
        )
    x, saved = saved[0], saved[1:]
    weight, saved = saved[:B], saved[B:]
    has_bias, has_scale, has_shift = ctx.has
    scale, shift, level, pre, mean, var = (saved[i * B:(i + 1) * B] for i in range(6))
    needs = ctx.needs_input_grad
    output_mask = [bool(needs[0]), any(needs[1])]
    _batch_stats, _eps, factor, bins, _down, _up, _ac, _act, input_position = ctx.config
    # Image pooling: the backward on the 1x1 level, x's gradient a broadcast view (_ops.pooled_only).
    block = (factor, bins, input_position)
    op_grad_out, op_x = _ops.level_backward_inputs(grad_out, x, level, *block)
    gx, gw, gb, gs, gt = torch.ops.msfused.multi_scale_backward_triton(
        op_grad_out, op_x, weight, scale, shift, level, pre, mean, var, *ctx.config, output_mask
    )
    gx = _ops.level_backward_grad_x(gx, x, *block)
    gw = [g if need else None for g, need in zip(gw, needs[1])]
    none_if_absent = lambda gs_, flags: [g if f else None for g, f in zip(gs_, flags)]  # noqa: E731
    return (gx if output_mask[0] else None, gw, none_if_absent(gb, has_bias), none_if_absent(gs, has_scale),
            none_if_absent(gt, has_shift)) + _no_grads(ctx.config)


multi_scale_forward_triton.register_autograd(_backward, setup_context=_setup_context)
