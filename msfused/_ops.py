"""Loading the compiled operators (msfused._C) and their fake kernels for torch.compile / export.

The schemas and the CPU/CUDA kernels and autograd live in C++ (csrc/); this module only loads the library,
refuses one built against another torch (that would crash rather than raise), and registers the
shape-only (fake) kernels. If the library cannot be used, msfused still imports, warns once with the
reason, and every call runs the reference composition. A source tree without its built extension that
shadows an installed msfused which has one (Python imports the ``msfused`` folder of the current
directory first: a clone after ``pip install .``) is named as such in that warning
(:func:`shadowed_install`), and ``python -m msfused`` runs the installed one instead.
``MSFUSED_NO_EXTENSION=1`` skips loading it on purpose (the reference and Triton backends only):
bench/gpu_check.sh checks the Triton backend while the extension is being rebuilt, which a process that
had it loaded could not survive.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from typing import List, Optional

import torch

_EXT = "msfused._C"
_error: Optional[str] = None
_build_info: dict = {}


_HERE = os.path.dirname(os.path.abspath(__file__))  # this msfused package's folder


def _has_extension(package_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(package_dir, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a or os.curdir) == os.path.realpath(b or os.curdir)


def shadowed_install() -> Optional[str]:
    """The folder of another msfused that Python would import but for this one, when this one has no
    compiled extension and that one has: this msfused is then a source tree (a clone's ``msfused/``,
    found first through the current directory or ``PYTHONPATH``) shadowing an installed package. None
    otherwise.

    Asks every import finder, as ``import msfused`` would, with this package's parent folder taken out
    of ``sys.path``: the path finder (site-packages, ``.pth`` entries) and the meta-path finders that
    editable installs add (setuptools' ``__editable__`` finders)."""
    if _has_extension(_HERE):
        return None
    parent = os.path.dirname(_HERE)
    other_path = [p for p in sys.path if not _same_dir(p, parent)]
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec("msfused", other_path)
            else:
                spec = finder.find_spec("msfused", None)
        except Exception:  # a third-party finder that cannot answer: it has no msfused for us
            continue
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        for location in locations:
            if not _same_dir(location, _HERE) and _has_extension(location):
                return os.path.abspath(location)
    return None


def _load() -> Optional[str]:
    """Imports msfused._C; returns why it cannot be used, or None."""
    if os.environ.get("MSFUSED_NO_EXTENSION", "0") not in ("", "0"):
        return "not loaded: MSFUSED_NO_EXTENSION is set"
    spec = importlib.util.find_spec(_EXT)
    # Only this package's own extension: an editable install's finder would otherwise hand a source tree
    # without one the installed tree's library, compiled from other sources.
    if spec is None or spec.origin is None or not _same_dir(os.path.dirname(spec.origin), _HERE):
        installed = shadowed_install()
        if installed is not None:
            return (
                f"msfused._C is not built in {_HERE}, a source tree that shadows the installed msfused in "
                f"{installed} (which has it): Python imports the msfused folder of the current directory "
                "(or of PYTHONPATH) first. Run from another directory, or build this tree in place "
                "(`python setup.py build_ext --inplace`)"
            )
        return "msfused._C is not built (install msfused with `pip install --no-build-isolation .`)"
    info_path = os.path.join(os.path.dirname(spec.origin), "_C.build.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            _build_info.update(json.load(f))
        built = _build_info.get("torch")
        if built != torch.__version__:
            return (
                f"msfused._C was built against torch {built} but torch {torch.__version__} is running; "
                "rebuild it with `pip install --no-build-isolation .`"
            )
    try:
        importlib.import_module(_EXT)
    except (ImportError, OSError) as e:  # missing symbols: another torch, or a broken build
        return f"msfused._C failed to load: {e}"
    return None


_error = _load()
# `python -m msfused` imports this package while locating its __main__ (sys.argv[0] is then "-m") and,
# shadowed, runs the installed msfused instead, saying so itself: no warning about this tree's kernels.
_running_installed = sys.argv[:1] == ["-m"] and _error is not None and "shadows the installed msfused" in _error
if _error is not None and not _running_installed:
    warnings.warn(f"msfused: fused kernels unavailable, using the reference composition: {_error}", RuntimeWarning)


def loaded() -> bool:
    """Whether the compiled operators are registered."""
    return _error is None


def load_error() -> Optional[str]:
    """Why msfused._C is not loaded (None when it is)."""
    return _error


def build_info() -> dict:
    """What msfused._C was built against (torch, CUDA), from the file the build writes beside it."""
    return dict(_build_info)


def has_kernel(dispatch_key: str) -> bool:
    """Whether the forward operator has a kernel for ``dispatch_key`` ('CPU', 'CUDA', ...)."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("msfused::multi_scale_forward", dispatch_key)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _level_size(factor: int, bins: List[int], b: int, H, W):
    if factor > 0:
        return H // factor, W // factor
    return bins[2 * b], bins[2 * b + 1]


def pooled_only(factor, bins, input_position: str) -> bool:
    """True when every branch pools ``x`` to 1x1 (bins (1, 1)) and ``x`` is not part of the output: image
    pooling. Such a block is ``x``'s spatial mean, the block on that 1x1 level and a broadcast back up, so
    autograd runs its backward on the 1x1 problem and gives ``x`` a broadcast view of the level's gradient
    (as ATen's ``mean`` does). The C++ autograd's ``pooled_only`` (csrc/block_config.h) is the same rule."""
    return input_position == "none" and len(factor) > 0 and all(
        f == 0 and bins[2 * b] == 1 and bins[2 * b + 1] == 1 for b, f in enumerate(factor))


def level_backward_inputs(grad_out, x, level, factor, bins, input_position):
    """``(grad_out, x)`` for ``multi_scale_backward`` as autograd calls it: for an image-pooling block
    (:func:`pooled_only`) the upstream gradient summed over the map and the (first) 1x1 level in place of
    ``x``, so the operator works on the 1x1 problem; unchanged otherwise. Finish with
    :func:`level_backward_grad_x`."""
    if not pooled_only(factor, bins, input_position):
        return grad_out, x
    return grad_out.sum((2, 3), keepdim=True), level[0]


def level_backward_grad_x(grad_x, x, factor, bins, input_position):
    """``x``'s gradient from the operator's result after :func:`level_backward_inputs`: for image pooling the
    level's gradient spread over the map (divided by its size) as a broadcast view of ``x``'s shape (the
    empty tensor it is where the operator was not asked for it)."""
    if not pooled_only(factor, bins, input_position) or grad_x.numel() == 0:
        return grad_x
    return grad_x.div_(x.shape[2] * x.shape[3]).expand(x.shape)


def convolves_resized(identity: bool, h: int, w: int, k: int, H: int, W: int) -> bool:
    """Whether a branch's part of a k x k projection convolves its resized branch directly, rather than per tap
    at its level (csrc/projection.h's convolves_resized: every backend splits the work by this rule)."""
    return identity or h * w * k * k > H * W


def tap_maps_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a per-tap branch's maps and of their gradient (csrc/projection.h's tap_maps_dtype): opmath
    (float32 for half and bfloat16). Each map is a partial sum of the one convolution the reference rounds once,
    so none is rounded to x's dtype; their 1x1 convolutions run in it (a half-precision activation and weight are
    exact there, TF32 included)."""
    return _stats_dtype(dtype)


def tap_weight(pw: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """The projection weight's part that reads channels [offset, offset + count) of the concatenation as one 1x1
    convolution to k * k * P channels (channel (ky * k + kx) * P + p): csrc/projection.h's tap_weight. A view of
    pw for k = 1, else a copy (no view has this layout)."""
    P, _, k, _ = pw.shape
    return pw[:, offset:offset + count].permute(2, 3, 0, 1).reshape(k * k * P, count, 1, 1)


def project_parts(pw: torch.Tensor, C: int, x_offset: int, branches, H: int, W: int) -> list:
    """The projection weight's parts in the layouts multi_scale_project_forward convolves them in (its
    ``project_parts``; csrc/projection.h's projection_parts): x's slice (P, C, k, k) (empty where x is not in
    the output, ``x_offset`` -1), then per branch (channel offset, channels, (h, w) level, identity): its slice
    where it convolves its resized branch directly, else its per-tap weight in the per-tap maps' dtype. Each a
    tensor of its own, never a view of pw (which a cache entry owned by pw would keep alive)."""
    k = pw.shape[2]
    fmt = torch._prims_common.suggest_memory_format(pw)
    parts = [pw[:, x_offset:x_offset + C].contiguous(memory_format=fmt) if x_offset >= 0
             else pw.new_empty((0,))]
    for offset, count, (h, w), identity in branches:
        if convolves_resized(identity, h, w, k, H, W):
            parts.append(pw[:, offset:offset + count].contiguous(memory_format=fmt))
        else:
            parts.append(tap_weight(pw, offset, count).to(tap_maps_dtype(pw.dtype)))
    return [t.clone() if t._base is not None else t for t in parts]


def multi_scale_forward_fake(
    x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
    activation, input_position,
):
    """Shapes, dtypes and memory formats of multi_scale_forward's results (any backend's operator)."""
    N, C, H, W = x.shape
    fmt = torch._prims_common.suggest_memory_format(x)
    like = dict(dtype=x.dtype, device=x.device)
    stats = dict(dtype=_stats_dtype(x.dtype), device=x.device)
    out_channels = sum(w.shape[0] for w in weight) + (C if input_position != "none" else 0)
    out = torch.empty((N, out_channels, H, W), memory_format=fmt, **like)
    level, pre, mean, var = [], [], [], []
    for b, w in enumerate(weight):
        h, wd = _level_size(factor[b], bins, b, H, W)
        cb = w.shape[0]
        level.append(torch.empty((0,), **like) if factor[b] == 1 else torch.empty((N, C, h, wd), memory_format=fmt, **like))
        pre.append(torch.empty((N, cb, h, wd), memory_format=fmt, **like))
        n_stats = cb if batch_stats[b] else 0
        mean.append(torch.empty((n_stats,), **stats))
        var.append(torch.empty((n_stats,), **stats))
    return out, level, pre, mean, var


def multi_scale_backward_fake(
    grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins, down_mode,
    up_mode, align_corners, activation, input_position, output_mask,
):
    """Shapes, dtypes and memory formats of multi_scale_backward's results (any backend's operator)."""
    like = dict(dtype=x.dtype, device=x.device)
    fmt = torch._prims_common.suggest_memory_format(x)
    empty = lambda: torch.empty((0,), **like)  # noqa: E731
    grad_x = torch.empty(x.shape, memory_format=fmt, **like) if output_mask[0] else empty()
    grad_weight = [
        torch.empty(w.shape, memory_format=torch._prims_common.suggest_memory_format(w), **like)
        if output_mask[1] else empty()
        for w in weight
    ]
    grad_bias = [torch.empty((w.shape[0],), **like) for w in weight]
    grad_param = lambda ts, ws: [  # noqa: E731
        torch.empty((w.shape[0],), dtype=t.dtype, device=x.device) if t is not None else empty()
        for t, w in zip(ts, ws)
    ]
    return grad_x, grad_weight, grad_bias, grad_param(scale, weight), grad_param(shift, weight)


def multi_scale_project_forward_fake(
    x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
    activation, input_position, project_weight, project_bias, project_scale, project_shift, project_batch_stats,
    project_eps, project_activation, save_pre, project_parts=(),
):
    """Shapes, dtypes and memory formats of multi_scale_project_forward's results: the block's saved
    tensors as multi_scale_forward's, the output and the projection's pre-activation (N, P, H, W; empty
    without save_pre)."""
    _cat, level, pre, mean, var = multi_scale_forward_fake(
        x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
        activation, input_position,
    )
    N, _, H, W = x.shape
    P = project_weight.shape[0]
    fmt = torch._prims_common.suggest_memory_format(x)
    out = torch.empty((N, P, H, W), memory_format=fmt, dtype=x.dtype, device=x.device)
    n_stats = P if project_batch_stats else 0
    stats = dict(dtype=_stats_dtype(x.dtype), device=x.device)
    p_pre = torch.empty_like(out) if save_pre else torch.empty((0,), dtype=x.dtype, device=x.device)
    return (out, level, pre, mean, var, p_pre, torch.empty((n_stats,), **stats),
            torch.empty((n_stats,), **stats))


def multi_scale_project_backward_fake(
    grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins, down_mode, up_mode,
    align_corners, activation, input_position, project_weight, project_scale, project_shift, project_pre,
    project_mean, project_var, project_batch_stats, project_eps, project_activation, output_mask,
):
    """Shapes, dtypes and memory formats of multi_scale_project_backward's results."""
    block = multi_scale_backward_fake(
        grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins, down_mode,
        up_mode, align_corners, activation, input_position, output_mask,
    )
    like = dict(dtype=x.dtype, device=x.device)
    P = project_weight.shape[0]
    grad_pw = (torch.empty(project_weight.shape, memory_format=torch._prims_common.suggest_memory_format(project_weight),
                           **like) if output_mask[1] else torch.empty((0,), **like))
    param = lambda t: (torch.empty((P,), dtype=t.dtype, device=x.device) if t is not None  # noqa: E731
                       else torch.empty((0,), **like))
    return (*block, grad_pw, torch.empty((P,), **like), param(project_scale), param(project_shift))


if loaded():
    torch.library.register_fake("msfused::multi_scale_forward")(multi_scale_forward_fake)
    torch.library.register_fake("msfused::multi_scale_backward")(multi_scale_backward_fake)
    torch.library.register_fake("msfused::multi_scale_project_forward")(multi_scale_project_forward_fake)
    torch.library.register_fake("msfused::multi_scale_project_backward")(multi_scale_project_backward_fake)
