"""``torch.compile(model, fullgraph=True)`` of a small model using a fused block: forward and gradients equal
to eager, in eval and train mode (running statistics too), no graph break (fullgraph=True guarantees it),
and the fused operator (not the reference composition) is what the graph calls. Few and small: compiling
takes ~10-30 s each on a small CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import msfused
from .conftest import Checker, make_input, randomize_, true_zero_gradients

pytestmark = pytest.mark.slow


def small_model(kind: str, momentum_none: bool = False) -> nn.Module:
    if kind == "ms":
        block = msfused.MultiScaleBlock(6, 4, scales=(1, 2, 3), down_mode="bilinear", norm="batch", activation="gelu")
    else:
        block = msfused.PyramidPooling(6, 4, bins=(1, 2, (3, 2)), bias=(True, False, False),
                                       norm=(None, "batch", "batch"), align_corners=True, input_position="last")
    if momentum_none:
        block.branches[1].norm = nn.BatchNorm2d(4, momentum=None)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, nn.Conv2d(block.out_channels, 5, 1))
    return randomize_(model)


def _run(model, x, g):
    out = model(x)
    grads = torch.autograd.grad(out, [x] + list(model.parameters()), g)
    return out, grads


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_compile_matches_eager(kind, mode, backend):
    eager = small_model(kind)
    eager.train(mode == "train")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    check = Checker(torch.float32, f"{kind}-{mode}-{backend}")
    for step in range(2):  # the second call reuses the compiled graph; running statistics evolve
        x = make_input((3, 3, 11, 9), torch.float32).requires_grad_(True)
        g = torch.randn(3, 5, 11, 9)
        out_e, grads_e = _run(eager, x, g)
        out_c, grads_c = _run(compiled, x, g)
        check("output", out_c, out_e)
        s = g.norm().item()
        names = ["x"] + [n for n, _ in eager.named_parameters()]
        zero = true_zero_gradients(eager)
        for n, a, b in zip(names, grads_c, grads_e):
            if n in zero:
                # a conv bias before a train-mode norm: true gradient 0, both values are float32 rounding
                # noise (see conftest.ZeroGradProbe); a wrong gradient would be O(s)
                assert (a - b).norm() <= 1e-4 * s, (n, a, b)
                continue
            check(f"grad {n}", a, b, s=s)
    for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(a, b), n
        else:
            check(n, a, b)


def test_compile_graph_calls_the_fused_operator():
    """The graph dynamo captures calls msfused::multi_scale_forward (not the reference composition)."""
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = small_model("ms").eval()
    x = make_input((2, 3, 9, 8), torch.float32)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend=recording_backend)(x)
    assert any("msfused.multi_scale_forward" in t for t in targets), targets
    assert not any("interpolate" in t or "avg_pool2d" in t for t in targets), targets
    Checker(torch.float32, "recording")("output", out, model(x))


def test_compile_train_momentum_none():
    """momentum=None (cumulative average, a data-dependent factor) in train mode under fullgraph compile."""
    eager = small_model("ms", momentum_none=True).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    check = Checker(torch.float32, "momentum_none")
    for _ in range(3):
        x = make_input((2, 3, 9, 8), torch.float32)
        with torch.no_grad():
            check("output", compiled(x), eager(x))
    for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(a, b), n
        else:
            check(n, a, b)
