"""SPEC.md's numbers, once: the norm-wise error, the tolerance per dtype, and the rounding bound for gradients
whose true value is exactly zero. Used by the test suite (tests/conftest.py) and the GPU check
(:mod:`msfused.bench.gpu_check`), so that both apply the same rules.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import BlockSpec

#: SPEC.md: float64 err <= 1e-10; float32 against a float64 reference err <= 1e-5.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: Safety factor of the rounding bound used for gradients whose true value is exactly zero (see
#: :class:`ZeroGradProbe`); the bound itself is the first-order rounding error of the computation.
ZERO_GRAD_K = 32.0

#: float32 tensors that are ill-conditioned (a cancelling sum, a norm over few values) miss 1e-5 in every
#: implementation, the naive module included: the fused value then passes when within this factor of the
#: naive composition's own float32 error (plus the tolerance). tests/conftest.py's Checker says more.
F32_ILL_CONDITIONED_FACTOR = 4.0

#: A float32 tensor may also be off by up to this many times its sensitivity to float32 rounding: the float64
#: reference's own change when x, the parameters and the upstream gradient are each perturbed by one float32
#: rounding (relative 2^-24, random signs). A backward-stable float32 computation is the exact one for inputs
#: perturbed by a few roundings per operation, so a short cancelling sum (a weight gradient over a 1x1 level
#: at N = 2: two terms) is off by this much whatever its order, while one noisy sample of the naive module's
#: own error can happen to be small (tests/test_properties.py, session seed 3047: err 5.3e-5, naive 3.2e-6,
#: sensitivity 1e-5 or so). A wrong kernel is off by O(1), far above.
F32_SENSITIVITY_FACTOR = 32.0


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


def _blocks(model: nn.Module) -> Iterator[Tuple[BlockSpec, Sequence[nn.Module], Optional[nn.Module]]]:
    """(spec, branches, projection or None) of every msfused block in ``model`` and of every third-party
    module in it that ``msfused.convert`` fuses (its plan: the module's own conv and norm modules, converted
    or not)."""
    import msfused
    from msfused import thirdparty

    blocks = (msfused.NaiveMultiScaleBlock, msfused.NaivePyramidPooling, msfused.MultiScaleBlock,
              msfused.PyramidPooling)
    for m in model.modules():
        if isinstance(m, blocks):
            yield m.spec, m.branches, m.project
        else:
            plan = thirdparty.plan_of(m)
            if plan is not None:
                yield plan.spec, plan.branches, plan.extra.get("project")


def _direct_zeros(spec: BlockSpec, branches: Sequence[nn.Module],
                  project: Optional[nn.Module]) -> Iterator[Tuple[nn.Parameter, nn.Module]]:
    """(conv bias, norm) for each conv bias (a branch's, the projection's) that feeds a norm normalising with
    the batch's statistics: that norm removes any constant, so the bias' true gradient is 0 whatever the data."""
    for part in list(branches) + ([project] if project is not None else []):
        if part.conv.bias is not None and uses_batch_stats(part.norm):
            yield part.conv.bias, part.norm


def _scalar_weights(spec: BlockSpec, branches: Sequence[nn.Module],
                    project: Optional[nn.Module]) -> Iterator[Tuple[nn.Conv2d, nn.Module]]:
    """(conv, norm) for each conv (a branch's, the projection's) that feeds a norm normalising with the batch's
    statistics and reads one input channel per group: where its input is so small that one tap alone reads
    data (``_single_tap``), each output channel is ``w·u + b`` with a scalar ``w`` that the norm cancels (it is
    invariant to a positive scale, but for its eps), so the weight's true gradient nearly cancels (e.g. C = 1
    and a 1x1 level: every implementation's float32 value is ~1e-3 off by SPEC's metric)."""
    for part in list(branches) + ([project] if project is not None else []):
        conv = part.conv
        if uses_batch_stats(part.norm) and conv.in_channels // conv.groups == 1 and \
                conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            yield conv, part.norm


def _single_tap(conv: nn.Conv2d, in_size: Sequence[int], out_size: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The one tap of ``conv``'s kernel that reads input data for an input of ``in_size`` (h, w) giving
    ``out_size``, or None when more than one does (the others read only zero padding)."""
    taps = []
    for n, m, k, p, d, st in zip(in_size, out_size, conv.kernel_size, conv.padding, conv.dilation, conv.stride):
        taps.append([i for i in range(k) if any(0 <= y * st - p + i * d < n for y in range(m))])
    return (taps[0][0], taps[1][0]) if len(taps[0]) == 1 and len(taps[1]) == 1 else None


def true_zero_gradients(model: nn.Module) -> set:
    """Names of the parameters of ``model`` whose true gradient is exactly 0 whatever the data: conv biases
    (of the branches and projections of msfused blocks and of the third-party blocks ``msfused.convert``
    fuses) that feed a norm normalising with the batch's statistics. (:class:`ZeroGradProbe` also finds the
    data-dependent ones.)"""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(bias)] for block in _blocks(model) for bias, _ in _direct_zeros(*block) if id(bias) in names}


@dataclasses.dataclass
class _Zero:
    """A parameter whose true gradient is (or may be) exactly 0: ``norm`` normalises with the batch's
    statistics and removes its effect. Direct (``branch`` None): a conv bias before ``norm``. Otherwise a
    constant shift of branch ``branch``'s pre-activation (its conv bias through ``gain``, an eval-mode norm's
    scale, or its norm's bias) that reaches ``norm`` through the projection's 1x1 ``conv`` (its input
    channels from ``offset``), which holds only where the activation is linear (open) over the whole batch
    at every position of the level, per channel (or closed everywhere: then no gradient at all)."""

    name: str
    norm: nn.Module
    branch: Optional[nn.Module] = None
    conv: Optional[nn.Conv2d] = None
    offset: int = 0
    activation: Optional[str] = None
    through_norm: bool = False  # the parameter is the branch norm's bias (else its conv's bias)
    weight_of: Optional[nn.Conv2d] = None  # the parameter is this conv's scalar weight (``_scalar_weights``):
    # its true gradient is not exactly 0 (the norm's eps), so it is compared with the reference's


class ZeroGradProbe:
    """For parameters whose true gradient is exactly 0 (a conv bias before a norm that normalises with batch
    statistics; a constant shift of a branch that reaches a projection's batch-statistics norm through its
    1x1 convolution: a bias of a branch whose activation is open for the whole batch, e.g. smp's bin-1
    branch), any computed gradient is rounding noise. SPEC.md's floor (1e-6 · s) is below that noise for
    every implementation (the naive module in float32 is ~1e-1 off by the metric, and in float64 two runs of
    the reference in two memory formats differ by more than 1e-10), so such gradients are checked against the
    first-order rounding bound of the norm's backward instead, per channel:

        |d bias_c| <= K · eps(dtype) · ( Σ|γ·invstd·dY| + |γ·invstd·mean(dY·x̂)| · invstd · Σ|conv| )

    (dY: gradient at the norm's output, conv: the norm's input, sums over N, h, w; measured on the float64
    reference with hooks; K = ZERO_GRAD_K). Through a projection, the channel's bound is
    ``gain_c · Σ_o |W_oc| · bound_o`` (W: the 1x1 projection's weight, bound_o: the above for its norm's
    channel o, gain_c: the branch's eval-mode norm scale for its conv bias, else 1). A wrong gradient (e.g.
    the norm's backward skipped) is O(s), far above this bound. A conv weight that is a scalar per output
    channel for the input at hand (one input channel per group and one tap reading data: C = 1 over a 1x1
    level) before such a norm has a true gradient of nearly 0: the norm cancels its scale but for its eps, so
    every implementation computes it as a cancelling sum, and it is checked as |grad − reference| against the
    same bound weighted by the conv's input (``_weight_scale``). ``ref``: a msfused block, or any model
    holding msfused blocks or third-party blocks that ``msfused.convert`` fuses (their branches' biases).
    """

    def __init__(self, ref: nn.Module):
        self.ref = ref
        self.norm_in: Dict[int, torch.Tensor] = {}
        self.norm_grad: Dict[int, torch.Tensor] = {}
        self.conv_out: Dict[int, torch.Tensor] = {}
        self.conv_in_size: Dict[int, Tuple[int, int]] = {}
        self.zeros: List[_Zero] = []
        self.handles = []
        names = {id(p): n for n, p in ref.named_parameters()}
        hooked = set()

        def hook(module, fn):
            if id(module) not in hooked:
                hooked.add(id(module))
                self.handles.append(module.register_forward_hook(fn))

        seen = set()
        for spec, branches, project in _blocks(ref):
            candidates = [(_Zero(names[id(b)], norm), None) for b, norm in _direct_zeros(spec, branches, project)
                          if id(b) in names]
            candidates += [(_Zero(names[id(c.weight)], norm, weight_of=c), c)
                           for c, norm in _scalar_weights(spec, branches, project) if id(c.weight) in names]
            if project is not None and uses_batch_stats(project.norm) and project.conv.kernel_size == (1, 1) and \
                    spec.activation in ("relu", None):
                offset = spec.in_channels if spec.input_position == "first" else 0
                for br, bspec in zip(branches, spec.branches):
                    params = [(br.conv.bias, False)] if not uses_batch_stats(br.norm) else []
                    if isinstance(br.norm, nn.modules.batchnorm._BatchNorm):
                        params.append((br.norm.bias, True))
                    for p, through_norm in params:
                        if p is not None and id(p) in names:
                            candidates.append((_Zero(names[id(p)], project.norm, br, project.conv, offset,
                                                     spec.activation, through_norm), br.conv))
                    offset += bspec.out_channels
            for z, conv in candidates:
                if z.name in seen:  # a block inside another (smp's PSPModule in its PSPDecoder)
                    continue
                seen.add(z.name)
                self.zeros.append(z)
                hook(z.norm, self._norm_hook(id(z.norm)))
                if conv is not None:
                    hook(conv, self._conv_hook(id(conv)))

    def _conv_hook(self, key):
        def hook(module, inputs, output):
            self.conv_out[key] = output.detach().clone()  # an in-place activation may follow
            self.conv_in_size[key] = tuple(inputs[0].shape[2:])
        return hook

    def _norm_hook(self, key):
        def hook(module, inputs, output):
            self.norm_in[key] = inputs[0].detach().clone()
            if output.requires_grad:  # (the gradient w.r.t. this value, even if an in-place activation follows)
                output.register_hook(lambda g: self.norm_grad.__setitem__(key, g.detach()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre_activation(self, z: _Zero) -> torch.Tensor:
        norm, conv_out = z.branch.norm, self.conv_out[id(z.branch.conv)]
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            return conv_out
        stats = uses_batch_stats(norm)
        return F.batch_norm(conv_out, None if stats else norm.running_mean, None if stats else norm.running_var,
                            norm.weight, norm.bias, stats, 0.0, norm.eps)

    def _holds(self, z: _Zero) -> bool:
        """Whether the true gradient is 0 in the last forward (per channel: activation open, or closed,
        everywhere)."""
        if z.weight_of is not None:
            return self._tap(z.weight_of) is not None
        if z.branch is None or z.activation is None:
            return True
        if id(z.branch.conv) not in self.conv_out:
            return False
        pre = self._pre_activation(z).detach()
        opened = (pre > 0).transpose(0, 1).flatten(1)
        return bool((opened.all(1) | (~opened).all(1)).all())

    def param_names(self) -> Dict[str, int]:
        """{name: index} of the parameters whose true gradient is 0 in the last forward (call after it)."""
        return {z.name: i for i, z in enumerate(self.zeros) if self._holds(z)}

    def _tap(self, conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
        key = id(conv)
        if key not in self.conv_in_size:
            return None
        return _single_tap(conv, self.conv_in_size[key], self.conv_out[key].shape[2:])

    def _norm_terms(self, norm: nn.Module):
        """The norm's backward, per channel, from the last forward: its input, dY, the batch mean, invstd,
        γ·invstd and mean(dY·x̂) (each shaped to broadcast over (N, C, H, W))."""
        conv, dy = self.norm_in[id(norm)], self.norm_grad[id(norm)]
        var, mean = torch.var_mean(conv, (0, 2, 3), correction=0, keepdim=True)
        invstd = (var + norm.eps).rsqrt()
        gamma = norm.weight.detach().view(1, -1, 1, 1) if norm.weight is not None else torch.ones_like(invstd)
        k = (dy * (conv - mean) * invstd).mean((0, 2, 3), keepdim=True)
        return conv, dy, mean, invstd, gamma * invstd, k

    def _weight_scale(self, z: _Zero) -> torch.Tensor:
        """Per output channel of a scalar weight (``_scalar_weights``): with u its input (the conv's output
        ``w·u + b`` divided back), dW = Σ dZ·u for dZ = γ·invstd·(dY − mean(dY) − x̂·mean(dY·x̂)); each term's
        rounding, weighted by |u|: Σ|γ·invstd·dY·u| + |γ·invstd·mean(dY)|·Σ|u| + |γ·invstd·mean(dY·x̂)| ·
        invstd · Σ(|conv| + |mean|)·|u|."""
        out, dy, mean, invstd, p, k = self._norm_terms(z.norm)
        conv = z.weight_of
        ti, tj = self._tap(conv)
        w = conv.weight.detach()[:, 0, ti, tj].view(1, -1, 1, 1).to(out.dtype)
        b = conv.bias.detach().view(1, -1, 1, 1).to(out.dtype) if conv.bias is not None else 0.0
        u = ((out - b) / w).abs()
        dims = (0, 2, 3)
        return ((p * dy).abs() * u).sum(dims) + (p * dy.mean(dims, keepdim=True)).abs().flatten() * u.sum(dims) + \
            ((p * k).abs() * invstd).flatten() * ((out.abs() + mean.abs()) * u).sum(dims)

    def _norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """Per channel of ``norm``: Σ|γ·invstd·dY| + |γ·invstd·mean(dY·x̂)| · invstd · Σ|conv| (the docstring)."""
        conv, dy, _, invstd, p, k = self._norm_terms(norm)
        conv_l1 = conv.abs().sum((0, 2, 3), keepdim=True)
        return (p * dy).abs().sum((0, 2, 3)) + ((p * k).abs() * invstd * conv_l1).flatten()

    def bound(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Per channel, the largest |gradient| rounding can give parameter ``i`` (``param_names``) in ``dtype``."""
        z = self.zeros[i]
        if z.weight_of is not None:  # per output channel, over the kernel (the other taps' exact 0 included)
            scale = self._weight_scale(z).detach().view(-1, 1, 1, 1)
        else:
            scale = self._through_projection(z, self._norm_scale(z.norm).detach())
        return (ZERO_GRAD_K * torch.finfo(dtype).eps * scale).to(device="cpu", dtype=torch.float64)

    def _through_projection(self, z: _Zero, scale: torch.Tensor) -> torch.Tensor:
        """A norm's per-channel bound carried back to the parameter (through the projection's 1x1 conv and the
        branch's eval-mode norm scale, for a _Zero with a branch; as it is otherwise)."""
        if z.branch is not None:
            w = z.conv.weight.detach().flatten(1).abs()  # (P, concatenation)
            scale = w.t()[z.offset:z.offset + z.branch.conv.out_channels] @ scale
            norm = z.branch.norm
            if not z.through_norm and isinstance(norm, nn.modules.batchnorm._BatchNorm):  # eval mode: scaled
                gain = (norm.running_var.detach() + norm.eps).rsqrt()
                scale = scale * (gain * norm.weight.detach().abs() if norm.weight is not None else gain)
        return scale

    def within(self, i: int, grad: torch.Tensor, tol: float, s: float, ref: Optional[torch.Tensor] = None) -> bool:
        """Whether ``grad`` (parameter ``i``'s gradient) is within the rounding bound of zero, or for a scalar
        weight (whose true gradient is only nearly 0) of ``ref``, its float64 reference value."""
        dev = grad.detach().to(device="cpu", dtype=torch.float64)
        if self.zeros[i].weight_of is not None:
            if ref is None:
                raise ValueError(f"{self.zeros[i].name}: a scalar weight's gradient is checked against its reference")
            dev = dev - ref.detach().to(device="cpu", dtype=torch.float64)
        dev = dev.abs()
        return bool((dev <= self.bound(i, grad.dtype) + tol * 1e-6 * s).all())
