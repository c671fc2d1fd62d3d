"""The floor of WORKLOADS.md: the least time a workload could take on the device.

``floor = max(bytes read / read rate + bytes written / write rate, conv FLOPs / matrix rate)``, with the
rates measured on the device once per run (:func:`measure_rates`) and the work counted from the
configuration (:func:`count_work`).

Why reads and writes apart: a kernel that mostly reads (pooling ``x`` to small levels) runs faster than
copy bandwidth, which is half reads and half writes; a floor of ``bytes / copy bandwidth`` is then above
what such a kernel reaches, and no floor at all. The read rate is that of a sum over a large buffer (every
byte read once, almost nothing written), the write rate that of filling one (every byte written once,
nothing read). Reads and writes share the memory bus, so their times add: a copy of ``n`` bytes takes
about ``n / read + n / write``.

Buffer sizes: on a GPU one buffer of 2 GiB (the timing flushes L2 before every call, so the workloads read
cold memory too). On a CPU the best rate over buffers of 32, 64 and 256 MiB, the sizes of the workloads'
tensors: a CPU's last-level cache can hold a good part of them between calls (this project's CI machine
reports 480 MiB of L3), and a 64 MiB sum measured about twice the 256 MiB one's rate there (45 against
24 GB/s). A floor from the largest buffer alone was beaten by 20-30% (``aspp_pool``, every implementation).

Counting rule (also in :func:`count_work`):

* Bytes: every tensor the step takes is read once and every tensor it gives is written once, at the
  element size it has; nothing in between (pooled levels, branch activations, the upsampled maps) is
  counted, as if it stayed on chip.

  - inference: read ``x`` and the whole ``state_dict`` (weights, biases, norm affine parameters and
    running statistics); write the output.
  - training step (forward + backward, one function of ``x``, the parameters and the upstream gradient):
    read ``x``, the ``state_dict`` and the upstream gradient; write the output, ``grad x``, one gradient
    per parameter, and the norms' updated running statistics. For image pooling alone (every branch a 1x1
    level, ``x`` not in the output: ``aspp_pool``) ``grad x`` is one value per (n, c) spread over the map,
    returned as a broadcast view as ATen's ``mean`` returns it, so it counts ``N * C`` elements.

* FLOPs: the convolutions only, 2 per multiply-add: ``2 * N * Cb * C * k * k * h * w`` for a branch of
  ``Cb`` output channels at level ``h x w``. Pooling, resizing, norm and activation are a few operations
  per byte moved and belong to the byte side. A training step counts 3 times the forward: the forward,
  the gradient of the conv input and the gradient of its weight each cost one forward's FLOPs.
  A block's projection (P outputs, k x k) counts what the work needs, not the convolution over the
  concatenation: ``2 * N * P * C * k * k * H * W`` for its ``x`` part (when ``x`` is in the output) and
  ``2 * N * P * Cb * k * k * h * w`` for each branch's part, at the branch's level.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Union

import torch

from .. import _ops
from . import timing
from .workloads import Workload

# Buffer sizes for measuring the memory rates (the best over them; see the module docstring).
_MEMORY_BYTES = {"cpu": (32 * 2**20, 64 * 2**20, 256 * 2**20), "cuda": (2 * 2**30,)}
_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclasses.dataclass(frozen=True)
class Rates:
    """What the device sustains: its read rate and write rate (GB/s, 1e9 bytes per second) and the
    matrix-multiply rate in ``dtype`` (TFLOP/s)."""

    device: str
    dtype: str
    read_gbps: float
    write_gbps: float
    matmul_tflops: float


@dataclasses.dataclass(frozen=True)
class Work:
    """The least work of one call: bytes read, bytes written and convolution FLOPs (see the module
    docstring)."""

    read_bytes: int
    write_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        """Bytes moved: read plus written."""
        return self.read_bytes + self.write_bytes


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def _float32_matmul_like_conv() -> Iterator[None]:
    """float32 matmuls at the precision cuDNN convolutions use (TF32 by PyTorch's default), so that the
    matrix rate is the one the naive block's convolutions can reach."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        attribute, wanted = "fp32_precision", conv.conv.fp32_precision  # the API since torch 2.9
    else:
        attribute, wanted = "allow_tf32", bool(conv.allow_tf32)
    previous = getattr(matmul, attribute)
    setattr(matmul, attribute, wanted)
    try:
        yield
    finally:
        setattr(matmul, attribute, previous)


def best_ms(fn, device: Union[str, torch.device], warmup: int, reps: int) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after ``warmup``: a rate for a floor is the best the
    device showed (a median let a slow moment of the machine's clock lift the floor above what a workload
    then reached: ``psp_head_mmseg`` ran at 0.94 of a floor from the median matmul)."""
    timing.warm_up(fn, device, warmup)
    return min(timing.time_calls(fn, device, reps))


def _buffers(device: torch.device) -> Iterator[torch.Tensor]:
    """One buffer of each measuring size in turn (one alive at a time)."""
    for nbytes in _MEMORY_BYTES.get(device.type, _MEMORY_BYTES["cpu"]):
        yield torch.ones(nbytes // 4, dtype=torch.float32, device=device)


def _memory_gbps(device: Union[str, torch.device], touch, reps: int) -> float:
    """GB/s of ``touch(buffer)`` over each buffer size, from its best time; the best over the sizes."""
    device = torch.device(device)
    return max(buf.numel() * buf.element_size() / (best_ms(lambda: touch(buf), device, warmup=2, reps=reps) * 1e-3)
               / 1e9 for buf in _buffers(device))


def measure_read_gbps(device: Union[str, torch.device], reps: int = 10) -> float:
    """The device's read rate in GB/s: summing a large tensor (every thread, vectorised: what a kernel that
    only reads can reach), the best time over the buffer sizes."""
    return _memory_gbps(device, torch.sum, reps)


def measure_write_gbps(device: Union[str, torch.device], reps: int = 10) -> float:
    """The device's write rate in GB/s: filling a large tensor, the best time over the buffer sizes."""
    return _memory_gbps(device, lambda buf: buf.fill_(2.0), reps)


def measure_matmul_tflops(device: Union[str, torch.device], dtype: torch.dtype, reps: int = 5) -> float:
    """The device's matrix-multiply rate in ``dtype`` (TFLOP/s), from the best time of one large
    square matmul (on a CPU in float32, or of the same product as a 1x1 convolution, if faster)."""
    device = torch.device(device)
    size = _MATMUL_SIZE.get(device.type, _MATMUL_SIZE["cpu"])
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    guard = _float32_matmul_like_conv() if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        ms = best_ms(lambda: torch.mm(a, b), device, warmup=2, reps=reps)
    if device.type == "cpu" and dtype == torch.float32:
        # The same product as a 1x1 convolution over a channels_last image (rows of a as pixels): oneDNN's
        # kernels, which ATen's convolutions and msfused's x part run, outrun the BLAS sgemm on some CPUs
        # (about 2x on an AMD EPYC, where MKL takes its AVX2 path), and the floor takes the faster.
        image = a.view(1, size, 1, size).permute(0, 3, 1, 2)
        weight = b.t().contiguous().view(size, size, 1, 1)
        ms = min(ms, best_ms(lambda: torch.conv2d(image, weight), device, warmup=2, reps=max(reps, 10)))
    return 2 * size**3 / (ms * 1e-3) / 1e12


def measure_rates(device: Union[str, torch.device], dtype: torch.dtype, memory_from: Optional[Rates] = None) -> Rates:
    """The rates for ``device`` and ``dtype`` (pass ``memory_from``, the rates of another dtype on the same
    device, to reuse its read and write rates: they do not depend on the dtype)."""
    device = torch.device(device)
    if memory_from is None:
        read, write = measure_read_gbps(device), measure_write_gbps(device)
    else:
        read, write = memory_from.read_gbps, memory_from.write_gbps
    return Rates(str(device), dtype_name(dtype), read, write, measure_matmul_tflops(device, dtype))


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    # Floating tensors take the block's dtype (module.to(dtype)); integer buffers keep theirs.
    element = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
    return t.numel() * element


def count_work(workload: Workload, n: int, mode: str, dtype: torch.dtype) -> Work:
    """Bytes and convolution FLOPs of one call of ``workload`` at batch ``n`` in ``mode`` ('inference' or
    'train'), by the counting rule of this module's docstring."""
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    module = workload.make_naive("meta")  # shapes only
    spec = module.spec
    element = torch.empty((), dtype=dtype).element_size()
    N, C, H, W = workload.input_shape(n)
    x_bytes = N * C * H * W * element
    out_bytes = N * spec.out_channels * H * W * element
    state_bytes = sum(_bytes(t, dtype) for t in module.state_dict().values())
    flops = 0
    for b in spec.branches:
        h, w = b.level_size(H, W)
        flops += 2 * N * b.out_channels * C * b.kernel_size**2 * h * w
        if spec.project:
            flops += 2 * N * spec.project.out_channels * b.out_channels * spec.project.kernel_size**2 * h * w
    if spec.project and spec.input_position:
        flops += 2 * N * spec.project.out_channels * C * spec.project.kernel_size**2 * H * W
    if mode == "inference":
        return Work(x_bytes + state_bytes, out_bytes, flops)
    param_bytes = sum(_bytes(p, dtype) for p in module.parameters())
    updated_buffer_bytes = sum(
        _bytes(t, dtype)
        for m in module.modules()
        if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats
        for t in m.buffers()
    )
    # grad x: for image pooling alone a broadcast of one value per (n, c) (_ops.pooled_only), as ATen's mean's
    args = spec.op_args()
    grad_x_bytes = N * C * element if _ops.pooled_only(args["factor"], args["bins"], args["input_position"]) else x_bytes
    reads = x_bytes + state_bytes + out_bytes  # x, state, upstream gradient (the output's shape)
    writes = out_bytes + grad_x_bytes + param_bytes + updated_buffer_bytes  # output, grad x, grads, running stats
    return Work(reads, writes, 3 * flops)


def floor_ms(work: Work, rates: Rates) -> float:
    """The floor in milliseconds: the larger of the memory time (reads at the read rate, then writes at the
    write rate) and the compute time."""
    memory_ms = (work.read_bytes / (rates.read_gbps * 1e9) + work.write_bytes / (rates.write_gbps * 1e9)) * 1e3
    compute_ms = work.flops / (rates.matmul_tflops * 1e12) * 1e3
    return max(memory_ms, compute_ms)
