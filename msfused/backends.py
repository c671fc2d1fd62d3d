"""Backend names, whether each is available (and why not), and which one a call uses.

Precedence: :func:`use_backend` (thread-local) over the ``MSFUSED_BACKEND`` environment variable over
``'auto'``. ``'auto'`` is ``'cpu'`` on a CPU; on CUDA it picks by measurement (:mod:`msfused.autotune`) among
the fused backends that can run the call (and the reference for calls that record no gradient), and falls
back to ``'reference'`` (with one warning) where no fused backend can run the call; an explicitly chosen
backend that cannot run it raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import warnings
from typing import Iterator, Optional, Tuple

import torch

from . import _ops

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ENV_VAR = "MSFUSED_BACKEND"

_local = threading.local()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run msfused calls in this thread with backend ``name`` ('auto', 'cpu', 'cuda', 'triton',
    'reference') inside the ``with`` block; overrides the ``MSFUSED_BACKEND`` environment variable."""
    _check_name(name, "use_backend(name)")
    previous = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


def requested_backend() -> str:
    """The backend asked for in this thread: use_backend, else MSFUSED_BACKEND, else 'auto'."""
    name = getattr(_local, "name", None)
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"the environment variable {ENV_VAR}")


def availability(name: str) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on this machine at all, and why not."""
    _check_name(name, "backend")
    if name in ("auto", "reference"):
        return True, ""
    if name == "triton":
        why = _triton_error()
        if why is None and not (torch.cuda.is_available() or _triton_interpreting()):
            why = "torch sees no CUDA device (and Triton's interpreter is off: TRITON_INTERPRET=1)"
        return why is None, why or ""
    if not _ops.loaded():
        return False, f"the extension msfused._C is not loaded: {_ops.load_error()}"
    if name == "cpu":
        return True, ""
    # 'cuda'
    if not _ops.has_kernel("CUDA"):
        return False, "msfused._C was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, ""


def _triton_error() -> Optional[str]:
    from . import triton as triton_backend

    return triton_backend.load_error()


def _triton_interpreting() -> bool:
    from . import triton as triton_backend

    return triton_backend.load_error() is None and triton_backend.interpreting()


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for devices autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _unsupported_reason(name: str, x: torch.Tensor) -> Optional[str]:
    """Why fused backend ``name`` cannot run a call on ``x``, or None if it can."""
    ok, why = availability(name)
    if not ok:
        return why
    device = x.device.type
    if name == "cpu" and device != "cpu":
        return f"backend 'cpu' runs CPU tensors, x is on {x.device}"
    if name == "cuda" and device != "cuda":
        return f"backend 'cuda' runs CUDA tensors, x is on {x.device}"
    if name == "cuda":
        why = _device_arch_reason(x.device.index if x.device.index is not None else torch.cuda.current_device())
        if why is not None:
            return why
    if name == "triton":
        from . import triton as triton_backend

        why = triton_backend.runs_on(device)
        if why is not None:
            return why
    return None


def cuda_arch_reason(capability: Tuple[int, int], arch_list: Optional[str]) -> Optional[str]:
    """Why CUDA kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST's spelling, e.g. "8.0;9.0+PTX") cannot
    run on a GPU of compute ``capability``, or None if they can (or the list is unknown, e.g. "native").
    A cubin runs on GPUs of its major version with the same or a higher minor one ("9.0a": that GPU
    only); PTX is compiled by the driver for any GPU at least as new."""
    entries = [e for e in re.split(r"[;\s]+", arch_list or "") if e]
    parsed = [re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", e) for e in entries]
    if not entries or not all(parsed):
        return None
    for m in parsed:
        arch = (int(m.group(1)), int(m.group(2)))
        if m.group(4) and arch <= capability:
            return None
        if m.group(3) == "a" and arch == capability:
            return None
        if m.group(3) != "a" and arch[0] == capability[0] and arch[1] <= capability[1]:
            return None
    return (f"msfused._C's CUDA kernels were built for {arch_list}, which cannot run on this GPU (compute "
            f"capability {capability[0]}.{capability[1]}); rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{capability[0]}.{capability[1]}")


@functools.lru_cache(maxsize=None)
def _device_arch_reason(index: int) -> Optional[str]:
    return cuda_arch_reason(torch.cuda.get_device_capability(index), _ops.build_info().get("cuda_arch_list"))


#: Backends whose kernels index with 32-bit offsets; they refuse up front any call in which one tensor would
#: have more elements than that (the CPU kernels, and ATen's convolution, index with int64).
INT32_INDEX_BACKENDS = ("triton",)
INT32_INDEX_LIMIT = 2**31 - 1


def index_limit_reason(name: str, x: torch.Tensor, spec) -> Optional[str]:
    """Why backend ``name`` cannot index the tensors of a call on ``x`` with block ``spec`` (a
    :class:`~msfused.spec.BlockSpec`): x, the output, a level or a convolution output past 2**31 - 1 elements
    for a backend with 32-bit offsets; None if it can. Reads shapes only (stride-0 views are fine)."""
    if name not in INT32_INDEX_BACKENDS or x.dim() != 4:
        return None
    N, C, H, W = x.shape
    sizes = {"x": x.numel(), "the output": N * spec.out_channels * H * W}
    for i, b in enumerate(spec.branches):
        h, w = b.level_size(H, W)
        sizes[f"branch {i}'s level"] = N * C * h * w
        sizes[f"branch {i}'s convolution output"] = N * b.out_channels * h * w
    what = max(sizes, key=sizes.get)
    if sizes[what] <= INT32_INDEX_LIMIT:
        return None
    return (f"backend {name!r} indexes with 32-bit offsets and {what} would have {sizes[what]} elements "
            f"(more than 2**31 - 1 = {INT32_INDEX_LIMIT}); split the batch, or use backend 'cpu' or 'reference'")


#: Backends that fuse a block's projection (SPEC.md, "The projection").
PROJECTION_BACKENDS = ("cpu", "cuda", "triton")


def projection_reason(name: str, spec) -> Optional[str]:
    """Why backend ``name`` cannot run block ``spec``'s projection, or None (no projection, or it can)."""
    if getattr(spec, "project", None) is None or name in PROJECTION_BACKENDS:
        return None
    return (f"backend {name!r} does not fuse a block's projection (only {', '.join(PROJECTION_BACKENDS)} "
            "do); use backend 'reference' or a block without project=")


def _call_reason(name: str, x: torch.Tensor, spec) -> Optional[str]:
    """Why backend ``name`` cannot run this particular call (its sizes, a projection), or None."""
    if spec is None:
        return None
    return projection_reason(name, spec) or index_limit_reason(name, x, spec)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


#: The fused backends 'auto' considers per device type, preferred first (msfused.autotune.ORDER says why).
AUTO_CANDIDATES = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def resolve(x: torch.Tensor, unfusable: Optional[str] = None, spec=None, call=None) -> str:
    """The concrete backend ('cpu', 'cuda', 'triton' or 'reference') that runs a call on ``x``;
    ``unfusable`` says why no fused backend can compute the block's branches, if so; ``spec`` (the block's
    configuration) lets a backend refuse calls it cannot size (``index_limit_reason``).
    ``'auto'``: among the fused backends that can run the call, :func:`msfused.autotune.choose` picks by
    measurement on CUDA (``call``, an :class:`msfused.autotune.Call`), else the first."""
    name = requested_backend()
    if name == "reference":
        return name
    if name != "auto":
        why = unfusable or _unsupported_reason(name, x) or _call_reason(name, x, spec)
        if why is not None:
            raise RuntimeError(f"msfused backend {name!r} cannot run this call: {why}")
        return name
    if call is not None and unfusable is None:
        from . import autotune

        known = autotune.known_choice(call)  # a measured key: its candidates were checked when it was measured
        if known is not None:
            return known
    candidates = AUTO_CANDIDATES.get(x.device.type, AUTO_CANDIDATES["cuda"])
    reasons, supported = [], []
    for candidate in candidates:
        why = unfusable or _unsupported_reason(candidate, x) or \
            _call_reason(candidate, x, spec)
        if why is None:
            supported.append(candidate)
        else:
            reasons.append(f"{candidate}: {why}")
    if supported:
        if call is None:
            return supported[0]
        from . import autotune

        return autotune.choose(supported, call)
    _warn_once(
        f"msfused: no fused backend runs on {x.device.type} ({'; '.join(reasons)}); "
        "using the reference composition"
    )
    return "reference"
