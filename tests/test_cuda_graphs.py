"""CUDA graph capture and replay (issue 6): a fused block captured in a torch.cuda.CUDAGraph replays with the
numbers of eager calls on the new inputs (eval mode, and train mode with the running statistics advancing
once per replay), and torch.cuda.make_graphed_callables trains through it (forward and backward graphed).
Needs a CUDA device and a fused CUDA backend ('cuda' or 'triton'); skipped otherwise, with the reason.
(Nothing in the Python layer synchronises with the device: no .item(), no host reads; the one exception
is BatchNorm's momentum=None, whose cumulative factor reads num_batches_tracked on the host, as PyTorch's
own BatchNorm does: not capturable either way.)"""

from __future__ import annotations

import copy

import pytest
import torch

import msfused
from .conftest import Checker, build_pair

if not torch.cuda.is_available():  # one skip for the module, not one per test
    pytest.skip("CUDA graph capture needs a CUDA device", allow_module_level=True)

CONFIGS = [
    ("ms", dict(scales=(1, 2, 4), down_mode="bilinear", norm="batch", activation="gelu")),
    ("psp", dict(bins=(1, 2, 3, 6), bias=(True, False, False, False), norm=(None, "batch", "batch", "batch"))),
]


def _fused_cuda_backends():
    return [name for name in ("cuda", "triton") if msfused.availability(name)[0]]


def _backend_params():
    names = _fused_cuda_backends() if torch.cuda.is_available() else []
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no fused CUDA backend in this build"))]
    return names


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def _capture(fn, static_x):
    """Warm-up on a side stream, then capture fn(static_x) into a CUDA graph; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind,kwargs", CONFIGS, ids=["ms", "psp"])
@pytest.mark.parametrize("backend", _backend_params())
def test_capture_and_replay(backend, kind, kwargs, mode):
    naive, fused = build_pair(kind, 8, kwargs, torch.float32)
    naive, fused = naive.cuda().train(mode == "train"), fused.cuda().train(mode == "train")
    static_x = torch.randn(4, 8, 24, 20, device="cuda")
    with msfused.use_backend(backend), torch.no_grad():
        graph, static_out = _capture(fused, static_x)
        # The module's state after warm-up and capture, for the reference to start from.
        reference = copy.deepcopy(naive)
        reference.load_state_dict(fused.state_dict())
        check = Checker(torch.float32, f"cuda-graph-{backend}-{kind}-{mode}")
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.cuda.synchronize()
            check("output", static_out, reference(static_x))
    for (n, a), (_, b) in zip(fused.named_buffers(), reference.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(a, b), n
        else:
            check(n, a, b)


@pytest.mark.parametrize("backend", _backend_params())
def test_make_graphed_callables_trains(backend):
    naive, fused = build_pair("ms", 8, dict(scales=(1, 2), norm=None, activation="silu"), torch.float32)
    naive, fused = naive.cuda().train(), fused.cuda().train()
    x = torch.randn(2, 8, 16, 16, device="cuda", requires_grad=True)
    with msfused.use_backend(backend):
        graphed = torch.cuda.make_graphed_callables(fused, (x,))
        check = Checker(torch.float32, f"make_graphed_callables-{backend}")
        for _ in range(3):
            xi = torch.randn_like(x).requires_grad_(True)
            xr = xi.detach().clone().requires_grad_(True)
            out, ref = graphed(xi), naive(xr)
            g = torch.randn_like(out)
            out.backward(g)
            ref.backward(g)
            torch.cuda.synchronize()
            check("output", out, ref)
            check("grad x", xi.grad, xr.grad, s=g.norm().item())
            for (n, p), (_, q) in zip(fused.named_parameters(), naive.named_parameters()):
                check(f"grad {n}", p.grad, q.grad, s=g.norm().item())
                p.grad = q.grad = None
