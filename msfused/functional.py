"""The functional entry: checks the input, picks the backend, folds eval-mode norms, calls the operator.

``multi_scale(x, spec, branches)`` is what both fused modules call. Norms behave exactly as each
``nn.BatchNorm2d``'s own ``forward`` would: eval mode with running statistics folds into a per-channel
scale and shift in the kernels' epilogue; otherwise the kernels normalise with the batch's statistics,
return them, and the running statistics are updated here (the operator never mutates its inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _ops, autotune, backends
from .naive import conv_and_norm
from .reference import reference_forward
from .spec import BlockSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _branch_name(spec: BlockSpec, i: int) -> str:
    b = spec.branches[i]
    return f"scales[{i}]={b.factor}" if b.factor else f"bins[{i}]={b.bins}"


def _named_parts(branches: nn.ModuleList, project: Optional[nn.Module]):
    """(name, module) of every part with parameters: ``branches[i]``, then ``project``."""
    parts = [(f"branches[{i}]", br) for i, br in enumerate(branches)]
    return parts + ([("project", project)] if project is not None else [])


def _walk(module: nn.Module, kind: str, prefix: str = ""):
    """(name, tensor) of every parameter (kind '_parameters') or buffer ('_buffers') of ``module`` and its
    submodules, as ``named_parameters`` / ``named_buffers`` name and order them, shared tensors repeated: the
    same walk without their memo sets and generator chain (it runs per call)."""
    for name, t in getattr(module, kind).items():
        if t is not None:
            yield prefix + name, t
    for name, sub in module._modules.items():
        if sub is not None:
            yield from _walk(sub, kind, prefix + name + ".")


def _tensors_match(branches: nn.ModuleList, project: Optional[nn.Module], device: torch.device, dtype: torch.dtype,
                   check_dtype: bool) -> bool:
    """Whether every parameter and buffer is on ``device`` (and every parameter of ``dtype``, if
    ``check_dtype``): :func:`check_input`'s per-call walk, without the names its messages need."""
    stack: List[nn.Module] = [branches] if project is None else [branches, project]
    while stack:
        m = stack.pop()
        if m is None:  # (a submodule slot set to None)
            continue
        for t in m._parameters.values():
            if t is not None and (t.device != device or (check_dtype and t.dtype != dtype)):
                return False
        for t in m._buffers.values():
            if t is not None and t.device != device:
                return False
        stack.extend(m._modules.values())
    return True


def check_input(x: torch.Tensor, spec: BlockSpec, branches: nn.ModuleList,
                project: Optional[nn.Module] = None) -> None:
    """Raises a clear exception naming the argument for any input SPEC.md calls bad."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] != spec.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the block expects in_channels={spec.in_channels}")
    H, W = x.shape[-2:]
    if H < 1 or W < 1:  # (an empty batch, N = 0, is fine: an empty output, as the reference gives)
        raise ValueError(f"x has an empty map of {H}x{W} (shape {tuple(x.shape)}); H and W must be at least 1")
    for i, b in enumerate(spec.branches):
        h, w = b.level_size(H, W)
        if h < 1 or w < 1:
            raise ValueError(
                f"{_branch_name(spec, i)} gives a level of {h}x{w} for x of {H}x{W}; a level must be at least 1x1"
            )
    if (project is None) != (spec.project is None):
        raise ValueError("the block's project module and its spec.project disagree (one is None)")
    check_dtype = not backends.autocast_enabled(x.device.type)
    device, dtype = x.device, x.dtype
    if _tensors_match(branches, project, device, dtype, check_dtype):
        return
    # A walk with names for the message: the first misplaced tensor, else the first mistyped one.
    misplaced = mistyped = None
    for part, module in _named_parts(branches, project):
        for name, t in _walk(module, "_parameters"):
            if misplaced is None and t.device != device:
                misplaced = (part, name, t)
            if check_dtype and mistyped is None and t.dtype != dtype:
                mistyped = (part, name, t)
        for name, t in _walk(module, "_buffers"):
            if misplaced is None and t.device != device:
                misplaced = (part, name, t)
    if misplaced is not None:
        part, name, t = misplaced
        raise ValueError(f"{part}.{name} is on {t.device} but x is on {x.device}")
    if mistyped is not None:
        part, name, t = mistyped
        raise TypeError(f"{part}.{name} has dtype {t.dtype} but x has {x.dtype}; they must match outside autocast")


class ParamCache:
    """What depends only on parameters and buffers (an eval-mode norm folded into a scale and a shift; a
    backend's packed weights), kept per (owner, name) and recomputed only when one of those tensors changes:
    another tensor object (``load_state_dict(assign=True)``, a replaced parameter), its ``_version``
    (in-place updates: ``load_state_dict``, an optimizer step, running statistics), its storage (``.data =``),
    device, dtype or shape. The owner is a module (the fold) or the parameter itself (a backend's packing,
    inside its operator); entries die with their owner and never keep a tensor alive. Only computed values
    that no gradient flows through are kept: the fold is differentiable in the norm's weight and bias, so
    with grad mode on and a tensor requiring grad it is computed per call (as when tracing: torch.compile
    and torch.export see the computation itself). Not seen: in-place writes through ``.data`` (which bypass
    the version counter, as gradcheck's perturbations do): no cached value is used where a gradient is taken."""

    def __init__(self) -> None:
        # id(owner) -> (a weak reference to owner, its entries): a plain dict looked up by id (a
        # WeakIdKeyDictionary lookup builds a weak reference per call, ~7 us); the reference's callback drops
        # the entries when the owner dies, and a reused id is told apart by the reference.
        self._entries: dict = {}

    def _owner_entries(self, owner: Any) -> dict:
        key = id(owner)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is owner:
            return hit[1]
        entries: dict = {}

        def forget(_ref, key=key, entries=entries, table=self._entries):
            if table.get(key, (None, None))[1] is entries:
                del table[key]

        self._entries[key] = (weakref.ref(owner, forget), entries)
        return entries

    #: Tensor types that belong to a trace (fake and functional tensors): never cached.
    _TRACED = (torch._subclasses.FakeTensor, torch._subclasses.functional_tensor.FunctionalTensor)

    @classmethod
    def _cacheable(cls, tensors: Sequence[Optional[torch.Tensor]]) -> bool:
        if torch.compiler.is_compiling():
            return False
        grad = torch.is_grad_enabled()
        for t in tensors:
            if t is None:
                continue
            if grad and t.requires_grad:
                return False
            # inference tensors keep no version counter
            if t.is_inference() or isinstance(t, cls._TRACED):
                return False
        return True

    @staticmethod
    def _signature(tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
        # a weak reference: the identity without keeping the tensor alive (an entry owned by it would
        # otherwise never die)
        return tuple(None if t is None else (weakref.ref(t), t._version, t.data_ptr(), t.device, t.dtype, t.shape)
                     for t in tensors)

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return len(a) == len(b) and all(
            (u is None and v is None) or
            (u is not None and v is not None and u[0]() is not None and u[0]() is v[0]() and u[1:] == v[1:])
            for u, v in zip(a, b))

    @staticmethod
    def _matches(signature: tuple, tensors: Sequence[Optional[torch.Tensor]]) -> bool:
        """``_same(signature, _signature(tensors))`` without building the new signature (it is per call)."""
        if len(signature) != len(tensors):
            return False
        for s, t in zip(signature, tensors):
            if s is None or t is None:
                if s is not t:
                    return False
            elif (s[0]() is not t or s[1] != t._version or s[2] != t.data_ptr() or s[4] != t.dtype or
                  s[3] != t.device or s[5] != t.shape):
                return False
        return True

    def get(self, owner: Any, name: str, tensors: Sequence[Optional[torch.Tensor]], extra: tuple,
            compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``owner``'s ``name``, cached while ``tensors`` (and the plain values ``extra``) stay
        the same."""
        if not self._cacheable(tensors):
            return compute()
        entries = self._owner_entries(owner)
        hit = entries.get(name)
        if hit is not None and hit[1] == extra and self._matches(hit[0], tensors):
            return hit[2]
        with torch.inference_mode(False), torch.no_grad():  # a value later calls may use in any mode
            value = compute()
        entries[name] = (self._signature(tensors), extra, value)
        return value

    def clear(self) -> None:
        self._entries = {}


#: The functional layer's parameter cache, shared by every backend.
PARAM_CACHE = ParamCache()


def _fold_norm(conv: nn.Module, norm: nn.Module, half: bool = False
               ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """An eval-mode norm with running statistics after ``conv`` as ``y = conv' * scale + shift``, with
    ``scale = weight * rsqrt(running_var + eps)`` (differentiable in the conv's bias and the norm's weight and
    bias). Where the running mean goes depends on the precision the convolution's output is stored in:

    * float32 / float64: into the conv's bias, ``conv' = conv - running_mean`` (a bias even where the conv has
      none), ``shift = bias`` of the norm. The norm weight's gradient is then the operator's
      ``sum(dY * (conv - running_mean)) * rsqrt(...)`` as ATen's batch_norm backward computes it, rather than
      ``(sum(dY * conv) - running_mean * sum(dY)) * rsqrt(...)``, a difference of two rounded sums that cancel
      where the conv's values sit near the running mean (float32 then misses SPEC.md's 1e-5 by far).
    * half precision (``half``: bfloat16 / float16 convolutions, autocast included): into the shift,
      ``shift = bias - running_mean * scale``, the conv's own bias kept. The stored conv output is then the
      value the naive module's norm reads, rounded as its is: centred first, it would carry a half-precision
      rounding of ``conv - running_mean``, up to several times the naive one's where the running mean is large
      beside the conv's values (seen as 2-3x the naive error of the norm weight's gradient under CPU autocast).
      The two sums' difference is taken from double-precision sums, far below half precision's rounding.

    The norm part in float32 at least: half-precision buffers would round the fold twice; the bias in the
    conv's dtype."""
    wide = lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # noqa: E731
    scale = torch.rsqrt(wide(norm.running_var) + norm.eps)
    if norm.weight is not None:
        scale = scale * wide(norm.weight)
    shift = wide(norm.bias) if norm.bias is not None else torch.zeros_like(scale)
    centre = wide(norm.running_mean)
    if half:
        return conv.bias, scale, shift - centre * scale
    bias = -centre if conv.bias is None else wide(conv.bias) - centre
    return bias.to(conv.weight.dtype), scale, shift


def _norm_epilogue(conv: nn.Module, norm: nn.Module, half: bool = False
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], bool, float]:
    """(bias, scale, shift, batch_stats, eps) for the kernels' conv and epilogue, as ``conv`` followed by
    ``norm.forward`` would compute: the conv's own bias, except for an eval-mode norm (``_fold_norm``; ``half``:
    the convolution runs in half precision, ``_half_precision``)."""
    if not isinstance(norm, _BatchNorm):  # nn.Identity (unfusable_reason vetted the rest)
        return conv.bias, None, None, False, 0.0
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    if batch_stats:
        return conv.bias, norm.weight, norm.bias, True, float(norm.eps)
    tensors = (norm.running_mean, norm.running_var, norm.weight, norm.bias, conv.bias)
    bias, scale, shift = PARAM_CACHE.get(norm, "fold", tensors, (float(norm.eps), conv.weight.dtype, bool(half)),
                                         lambda: _fold_norm(conv, norm, half))
    return bias, scale, shift, False, float(norm.eps)


def _half_precision(x: torch.Tensor) -> bool:
    """Whether the block's convolutions run in half precision on ``x``: x itself in bfloat16 / float16, or
    autocast on x's device to one of them."""
    halves = (torch.float16, torch.bfloat16)
    if x.dtype in halves:
        return True
    device = x.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in halves
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _update_running_stats(updates: List[Tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor, int]]) -> None:
    """What ``nn.BatchNorm2d.forward`` does to its buffers in training mode, for each (norm, batch mean, biased
    batch variance, values per channel) of ``updates``: every norm's buffers in a few multi-tensor ops (a
    block's four branches took ~40 small ops, a launch each on a GPU), element for element the arithmetic of
    one norm's update (computed in the statistics' precision, rounded once into the buffer, as ATen does)."""
    updates = [u for u in updates if u[0].training and u[0].track_running_stats]
    if not updates:
        return
    # Detached statistics rather than a no_grad block: the same, and torch.export serialises it (a no_grad
    # block in a train-mode program becomes a set_grad_enabled node that torch.export.save refuses).
    tracked = [norm.num_batches_tracked for norm, *_ in updates if norm.num_batches_tracked is not None]
    if tracked:
        torch._foreach_add_(tracked, 1)
    factors = []
    for norm, *_ in updates:
        factor = norm.momentum
        if norm.num_batches_tracked is not None and norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
        factors.append(0.0 if factor is None else factor)
    for which in ("running_mean", "running_var"):
        rows = [(getattr(norm, which), mean if which == "running_mean" else var, count, f)
                for (norm, mean, var, count), f in zip(updates, factors) if getattr(norm, which) is not None]
        if not rows:
            continue
        buffers, f = [r[0] for r in rows], [r[3] for r in rows]
        stats = [r[1].detach() for r in rows]
        if which == "running_var":  # the unbiased variance
            stats = torch._foreach_mul(stats, [count / (count - 1) for _, _, count, _ in rows])
        new = torch._foreach_mul([b.to(s.dtype) for b, s in zip(buffers, stats)], [1.0 - v for v in f])
        torch._foreach_add_(new, torch._foreach_mul(stats, f))
        torch._foreach_copy_(buffers, new)


def _needs_grad(x: torch.Tensor, branches: nn.ModuleList, project: Optional[nn.Module] = None) -> bool:
    """Whether autograd would record this call (some input requires grad and grad mode is on)."""
    if not torch.is_grad_enabled():
        return False
    parts = [branches] + ([project] if project is not None else [])
    return x.requires_grad or any(p.requires_grad for part in parts for p in part.parameters())


def _check_batch_values(norm: nn.Module, count: int, shape: List[int], name: str) -> None:
    """The same check, and message, as F.batch_norm: more than one value per channel in training."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)} ({name})")


def _operator(backend: str):
    """The forward operator of a fused backend: the C++ one ('cpu', 'cuda') or the Triton one."""
    if backend == "triton":
        return torch.ops.msfused.multi_scale_forward_triton
    return torch.ops.msfused.multi_scale_forward


def _branch_args(x: torch.Tensor, spec: BlockSpec, branches) -> tuple:
    """The operators' per-branch tensor lists and settings: weight, bias, scale, shift, batch_stats, eps."""
    weight: List[torch.Tensor] = []
    bias: List[Optional[torch.Tensor]] = []
    scale: List[Optional[torch.Tensor]] = []
    shift: List[Optional[torch.Tensor]] = []
    batch_stats: List[bool] = []
    eps: List[float] = []
    N, _, H, W = x.shape
    half = _half_precision(x)
    for i, branch in enumerate(branches):
        weight.append(branch.conv.weight)
        b, s, t, stats, e = _norm_epilogue(branch.conv, branch.norm, half)
        if stats:
            h, w = spec.branches[i].level_size(H, W)
            _check_batch_values(branch.norm, N * h * w, [N, spec.branches[i].out_channels, h, w],
                                f"branches[{i}].norm")
        bias.append(b)
        scale.append(s)
        shift.append(t)
        batch_stats.append(stats)
        eps.append(e)
    return weight, bias, scale, shift, batch_stats, eps


def _branch_stats(x: torch.Tensor, spec: BlockSpec, branches, batch_stats, mean, var) -> list:
    """The running-statistics updates of the branches whose norms used batch statistics."""
    N, _, H, W = x.shape
    updates = []
    for i, branch in enumerate(branches):
        if batch_stats[i]:
            h, w = spec.branches[i].level_size(H, W)
            updates.append((branch.norm, mean[i], var[i], N * h * w))
    return updates


def _fused_forward(x: torch.Tensor, spec: BlockSpec, branches: nn.ModuleList, backend: str,
                   project: Optional[nn.Module] = None) -> torch.Tensor:
    if project is not None:
        return _fused_project_forward(x, spec, branches, project, backend)
    weight, bias, scale, shift, batch_stats, eps = _branch_args(x, spec, branches)
    if backend == "triton":  # absent tensors as empty ones (msfused/triton/ops.py says why)
        from .triton.ops import absent_as_empty

        bias, scale, shift = (absent_as_empty(ts, x) for ts in (bias, scale, shift))
        if not any(batch_stats) and not _needs_grad(x, branches):  # nothing to save for backward
            args = spec.op_args()
            return torch.ops.msfused.multi_scale_inference_triton(x, weight, bias, scale, shift, **args)
    out, _level, _pre, mean, var = _operator(backend)(
        x, weight, bias, scale, shift, batch_stats, eps, **spec.op_args()
    )
    _update_running_stats(_branch_stats(x, spec, branches, batch_stats, mean, var))
    return out


def _project_parts(x: torch.Tensor, spec: BlockSpec, pw: torch.Tensor) -> List[torch.Tensor]:
    """The projection weight ``pw``'s parts in the layouts the C++ operators convolve them in
    (``_ops.project_parts``), from the parameter cache: copied once per version of the weight (and per layout: a
    branch's changes with the input's size), not per call. None where the cache keeps nothing (torch.compile,
    inference tensors): the operator then slices the weight itself."""
    if torch.compiler.is_compiling() or not PARAM_CACHE._cacheable([pw]):
        return []
    N, C, H, W = x.shape
    offset = C if spec.input_position == "first" else 0
    branches = []
    for branch in spec.branches:
        branches.append((offset, branch.out_channels, branch.level_size(H, W), branch.is_identity_level))
        offset += branch.out_channels
    x_offset = {"first": 0, "last": offset}.get(spec.input_position, -1)
    k = pw.shape[2]
    layout = tuple(_ops.convolves_resized(identity, h, w, k, H, W) for _, _, (h, w), identity in branches)
    return PARAM_CACHE.get(pw, f"project_parts.{C}.{layout}", (pw,), (),
                           lambda: _ops.project_parts(pw, C, x_offset, branches, H, W))


def _fused_project_forward(x: torch.Tensor, spec: BlockSpec, branches, project, backend: str) -> torch.Tensor:
    """The block and its projection through msfused::multi_scale_project_forward (backends 'cpu' and 'cuda':
    the operator's kernel for the device) or msfused::multi_scale_project_forward_triton (backend 'triton')."""
    weight, bias, scale, shift, batch_stats, eps = _branch_args(x, spec, branches)
    if backend == "triton":  # absent tensors as empty ones (msfused/triton/ops.py says why)
        from .triton.ops import absent_as_empty

        bias, scale, shift = (absent_as_empty(ts, x) for ts in (bias, scale, shift))
        op = torch.ops.msfused.multi_scale_project_forward_triton
    else:  # the C++ operator: looked up only here, so that 'triton' runs without the extension
        op = torch.ops.msfused.multi_scale_project_forward
    p_bias, p_scale, p_shift, p_stats, p_eps = _norm_epilogue(project.conv, project.norm, _half_precision(x))
    N, _, H, W = x.shape
    if p_stats:
        _check_batch_values(project.norm, N * H * W, [N, spec.project.out_channels, H, W], "project.norm")
    # The projection's pre-activation is kept only for a backward (inference writes the output in its place).
    tensors = [x, project.conv.weight, project.conv.bias, *project.norm.parameters()]
    for branch in branches:
        tensors += [branch.conv.weight, branch.conv.bias, *branch.norm.parameters()]
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # Without a gradient the C++ operators take the weight's parts from the parameter cache (Triton caches its
    # own per-tap weights)
    parts = {} if backend == "triton" else dict(
        project_parts=[] if save_pre else _project_parts(x, spec, project.conv.weight))
    out, _level, _pre, mean, var, _p_pre, p_mean, p_var = op(
        x, weight, bias, scale, shift, batch_stats, eps, **spec.op_args(),
        project_weight=project.conv.weight, project_bias=p_bias, project_scale=p_scale,
        project_shift=p_shift, project_batch_stats=p_stats, project_eps=p_eps, **spec.project.op_args(),
        save_pre=save_pre, **parts,
    )
    _update_running_stats(_branch_stats(x, spec, branches, batch_stats, mean, var) +
                          ([(project.norm, p_mean, p_var, N * H * W)] if p_stats else []))
    return out


def _autocast_kernels() -> dict:
    """{(device type, op): True} for the ops the block's naive composition calls that autocast handles on that
    device: read once from the dispatcher (an Autocast<DEVICE> kernel), not hard-coded per device, and kept
    in a dict so that torch.compile can trace the lookups."""
    found = {}
    for device in ("cpu", "cuda", "xpu", "mps", "hpu"):
        for op in ("aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::cat"):
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autocast" + device.upper()):
                    found[(device, op)] = True
            except RuntimeError:  # no such dispatch key in this build
                pass
    return found


_AUTOCAST_KERNELS = _autocast_kernels()


def _upsample_runs_in_float32(device_type: str, up_mode: str) -> bool:
    """Whether autocast on ``device_type`` runs ``F.interpolate`` (the up-resize) in float32: CUDA's autocast
    lists upsample_bilinear2d / upsample_nearest2d as float32 ops, CPU's does not (they run in the input's
    dtype)."""
    op = "aten::upsample_bilinear2d" if up_mode == "bilinear" else "aten::upsample_nearest2d"
    return _AUTOCAST_KERNELS.get((device_type, op), False)


def _autocast_output_dtype(x: torch.Tensor, spec: BlockSpec, low: torch.dtype) -> torch.dtype:
    """The dtype of the naive composition's output under autocast to ``low`` on ``x``'s device: each branch
    leaves the conv, norm (float32 parameters, output in ``low``) and activation in ``low``, its up-resize
    (if any) in float32 where autocast lists upsampling as a float32 op, and ``torch.cat`` promotes them
    together with ``x`` (if part of the output)."""
    H, W = x.shape[-2:]
    up32 = _upsample_runs_in_float32(x.device.type, spec.up_mode)
    dtypes = [torch.float32 if up32 and tuple(b.level_size(H, W)) != (H, W) else low for b in spec.branches]
    if spec.input_position:
        dtypes.append(x.dtype)
    return functools.reduce(torch.promote_types, dtypes)


class _CastBranch:
    """Stands in for a branch under autocast: ``conv.weight`` / ``conv.bias`` cast, ``norm`` the module itself."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], norm: nn.Module):
        self.conv = self
        self.weight, self.bias, self.norm = weight, bias, norm


def _autocast_forward(x: torch.Tensor, spec: BlockSpec, branches: nn.ModuleList,
                      fused_forward: Callable[..., torch.Tensor], project: Optional[nn.Module] = None) -> torch.Tensor:
    """The fused block under autocast, following autocast's rules as the naive module does: the
    convolutions in the autocast dtype (x and the conv parameters cast to it, differentiably, as autocast
    casts them for ``F.conv2d``), the norms with their own (float32) parameters and buffers (statistics
    in float32, running statistics updated in the buffers' dtype), and the output in the dtype
    ``torch.cat`` gives the naive module (``_autocast_output_dtype``): ``x`` itself, when part of the
    output, is kept exactly in its own dtype. With a projection, its convolution runs in the autocast dtype
    too and the output has that dtype (SPEC.md). ``fused_forward(x, spec, branches, project=...)`` runs the
    chosen fused backend, with autocast off."""
    device = x.device.type
    low = torch.get_autocast_dtype(device)
    params = [(part, n, t) for part, m in _named_parts(branches, project)
              for n, t in (("conv.weight", m.conv.weight), ("conv.bias", m.conv.bias)) if t is not None]
    if x.dtype == torch.float64 or any(t.dtype == torch.float64 for _, _, t in params):
        # Autocast leaves float64 alone: all float64 runs as without autocast; a mix is what F.conv2d refuses.
        for part, n, t in params:
            if t.dtype != x.dtype:
                raise TypeError(f"{part}.{n} has dtype {t.dtype} but x has {x.dtype}; autocast does not "
                                "cast float64, so under autocast float64 x and weights must match")
        with torch.autocast(device, enabled=False):
            return fused_forward(x, spec, branches, project=project)
    cast = lambda m: _CastBranch(m.conv.weight.to(low), None if m.conv.bias is None else m.conv.bias.to(low),  # noqa: E731
                                 m.norm)
    if spec.input_position and x.dtype not in (torch.float32, low) and _AUTOCAST_KERNELS.get((device, "aten::cat")):
        # CPU autocast's torch.cat (its promote policy) joins float32 and the autocast dtype only.
        raise TypeError(f"under autocast to {low} on {device}, x of dtype {x.dtype} cannot join the branches "
                        f"(torch.cat refuses to mix {x.dtype} with them there, the naive module too); pass x "
                        f"as float32 or {low}")
    if project is not None:
        # The projection's convolution reads the whole concatenation in ``low``: x and every branch in ``low``.
        with torch.autocast(device, enabled=False):
            return fused_forward(x.to(low), spec, [cast(br) for br in branches], project=cast(project))
    out_dtype = _autocast_output_dtype(x, spec, low)
    with torch.autocast(device, enabled=False):
        cast_branches = [cast(br) for br in branches]
        if x.dtype == low == out_dtype:
            return fused_forward(x, spec, cast_branches)
        # The branches from the fused kernels in ``low``; x joins them in its own dtype, as in torch.cat.
        y = fused_forward(x.to(low), dataclasses.replace(spec, input_position=None), cast_branches)
        if spec.input_position is None:
            return y.to(out_dtype)
        parts = [x.to(out_dtype), y.to(out_dtype)]
        if spec.input_position == "last":
            parts.reverse()
        return torch.cat(parts, 1).contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


class _FourD:
    """Stands in for a 4-D tensor to a norm's own ``_check_input_dim`` (which reads ``dim()`` only)."""

    def dim(self) -> int:
        return 4


_FOUR_D = _FourD()


_norm_reasons: dict = {}  # type -> norm_unfusable_reason (asked per call)


def norm_unfusable_reason(norm: nn.Module) -> Optional[str]:
    """Why the fused kernels cannot compute ``norm`` on a 4-D conv output as its own ``forward`` would, from
    its type alone (SPEC.md: ``nn.Identity``, or a ``_BatchNorm`` subclass that keeps ``_BatchNorm.forward``
    and takes 4-D input; ``nn.SyncBatchNorm`` too, whose training mode ``unfusable_reason`` refuses), or None.
    Found once per type."""
    if torch.compiler.is_compiling():
        return _norm_type_reason(norm)
    cls = type(norm)
    if cls not in _norm_reasons:
        _norm_reasons[cls] = _norm_type_reason(norm)
    return _norm_reasons[cls]


def _norm_type_reason(norm: nn.Module) -> Optional[str]:
    if type(norm) is nn.Identity:
        return None
    name = type(norm).__name__
    if not isinstance(norm, _BatchNorm):
        return f"a {name}; the fused kernels compute a BatchNorm (a _BatchNorm subclass) or no norm"
    if type(norm).forward is not _BatchNorm.forward and type(norm).forward is not nn.SyncBatchNorm.forward:
        return f"a {name}, which overrides _BatchNorm.forward"
    if type(norm)._check_input_dim is not nn.BatchNorm2d._check_input_dim:
        try:
            norm._check_input_dim(_FOUR_D)
        except ValueError:
            return f"a {name}, which does not take a 4-D input"
    return None


def unfusable_reason(spec: BlockSpec, branches: nn.ModuleList, now: bool = True,
                     project: Optional[nn.Module] = None) -> Optional[str]:
    """Why the fused kernels cannot compute these branches and projection (a conv or norm other than
    SPEC.md's; ``now``: also an ``nn.SyncBatchNorm`` in training mode, whose statistics span processes), or
    None."""
    parts = [(f"branches[{i}]", br, b.kernel_size, spec.in_channels, b.out_channels)
             for i, (b, br) in enumerate(zip(spec.branches, branches))]
    if project is not None:
        p = spec.project
        parts.append(("project", project, p.kernel_size, spec.concat_channels, p.out_channels))
    for name, part, k, in_channels, out_channels in parts:
        conv, norm = conv_and_norm(part)
        if type(conv) is not nn.Conv2d or conv.kernel_size != (k, k) or conv.stride != (1, 1) or \
                conv.padding != (k // 2, k // 2) or conv.dilation != (1, 1) or conv.groups != 1 or \
                conv.padding_mode != "zeros" or conv.in_channels != in_channels or \
                conv.out_channels != out_channels:
            return f"{name}.conv is not the plain {k}x{k} nn.Conv2d (stride 1, padding {k // 2}) the block built"
        why = norm_unfusable_reason(norm)
        if why is not None:
            return f"{name}.norm is {why}"
        if type(norm) is not nn.Identity and norm.num_features != out_channels:
            return f"{name}.norm has {norm.num_features} features, the conv gives {out_channels} channels"
        if now and isinstance(norm, nn.SyncBatchNorm) and norm.training:
            return (f"{name}.norm is an nn.SyncBatchNorm in training mode, whose batch statistics span "
                    "processes; the fused kernels compute per-process statistics")
    return None


def _run(x: torch.Tensor, branches: nn.ModuleList, backend: str, spec: BlockSpec,
         project: Optional[nn.Module] = None) -> torch.Tensor:
    """The block on ``x`` with the concrete ``backend`` (the user's call, and 'auto''s measurements)."""
    if backend == "reference":
        return reference_forward(x, spec, branches, project)
    if backends.autocast_enabled(x.device.type):
        return _autocast_forward(x, spec, branches, functools.partial(_fused_forward, backend=backend), project)
    return _fused_forward(x, spec, branches, backend, project)


def multi_scale(x: torch.Tensor, spec: BlockSpec, branches: nn.ModuleList,
                project: Optional[nn.Module] = None) -> torch.Tensor:
    """The multi-scale block of SPEC.md on ``x`` (N, C, H, W), with ``branches[i].conv`` / ``.norm`` and,
    when ``spec.project`` is set, the projection ``project.conv`` / ``.norm``.

    Runs the backend :mod:`msfused.backends` picks for ``x`` (``use_backend`` / ``MSFUSED_BACKEND`` /
    ``'auto'``). Returns (N, out_channels, H, W), channels_last exactly when ``x.suggest_memory_format()``
    is. Raises ``TypeError`` / ``ValueError`` naming the argument for bad input; never modifies ``x`` or
    the parameters (training-mode norms update their running statistics, as ``nn.BatchNorm2d`` does).
    """
    check_input(x, spec, branches, project)
    call = autotune.Call(x, spec, branches, _needs_grad(x, branches, project), functools.partial(_run, spec=spec),
                         project)
    name = backends.resolve(x, unfusable_reason(spec, branches, project=project), spec, call)
    return _run(x, branches, name, spec, project)
