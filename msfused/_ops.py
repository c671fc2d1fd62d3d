"""Loading the compiled operators (msfused._C) and their fake kernels for torch.compile / export.

The schemas and the CPU/CUDA kernels and autograd live in C++ (csrc/); this module only loads the library,
refuses one built against another torch (that would crash rather than raise), and registers the
shape-only (fake) kernels. If the library cannot be used, msfused still imports, warns once with the
reason, and every call runs the reference composition. ``MSFUSED_NO_EXTENSION=1`` skips loading it on purpose
(the reference and Triton backends only): bench/gpu_check.sh checks the Triton backend while the extension is
being rebuilt, which a process that had it loaded could not survive.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from typing import List, Optional

import torch

_EXT = "msfused._C"
_error: Optional[str] = None
_build_info: dict = {}


def _load() -> Optional[str]:
    """Imports msfused._C; returns why it cannot be used, or None."""
    if os.environ.get("MSFUSED_NO_EXTENSION", "0") not in ("", "0"):
        return "not loaded: MSFUSED_NO_EXTENSION is set"
    spec = importlib.util.find_spec(_EXT)
    if spec is None or spec.origin is None:
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
if _error is not None:
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


if loaded():
    torch.library.register_fake("msfused::multi_scale_forward")(multi_scale_forward_fake)
    torch.library.register_fake("msfused::multi_scale_backward")(multi_scale_backward_fake)
