"""``torch.compile(model, fullgraph=True)`` of a small model using a fused block: forward and gradients equal
to eager, in eval and train mode (running statistics too), no graph break (fullgraph=True guarantees it),
and the fused operator (not the reference composition) is what the graph calls. Few and small: compiling
takes ~10-30 s each on a small CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import msfused
from .conftest import Checker, make_input, norm_err, randomize_, true_zero_gradients

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


def _check_grads(check, eager, got, want, s):
    """Gradients of x and of every parameter of ``eager``, compiled (got) against eager (want)."""
    names = ["x"] + [n for n, _ in eager.named_parameters()]
    zero = true_zero_gradients(eager)
    for n, a, b in zip(names, got, want):
        if n in zero:
            # a conv bias before a train-mode norm: true gradient 0, both values are float32 rounding
            # noise (see conftest.ZeroGradProbe); a wrong gradient would be O(s)
            assert (a - b).norm() <= 1e-4 * s, (n, a, b)
            continue
        check(f"grad {n}", a, b, s=s)


def _check_buffers(check, compiled_model, eager):
    for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(a, b), n
        else:
            check(n, a, b)


def _run(model, x, g):
    out = model(x)
    grads = torch.autograd.grad(out, [x] + list(model.parameters()), g)
    return out, grads


# aot_eager for every (kind, mode); inductor (a slow compile) for two of them, each kind and each mode once
# (inductor on the factor pyramid in eval mode: test_compile_dynamic_inductor).
COMPILE_CASES = [(kind, mode, "aot_eager") for kind in ("ms", "psp") for mode in ("eval", "train")]
COMPILE_CASES += [("ms", "train", "inductor"), ("psp", "eval", "inductor")]


@pytest.mark.parametrize("kind,mode,backend", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
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
        _check_grads(check, eager, grads_c, grads_e, s)
    _check_buffers(check, compiled_model, eager)


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
    _check_buffers(check, compiled_model, eager)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_compile_dynamic_shapes(kind, mode):
    """dynamic=True: the graph compiled on the first call (fullgraph: no graph break) serves later batch sizes
    and map sizes without a recompile, with the eager module's outputs, gradients and running statistics."""
    eager = small_model(kind)
    eager.train(mode == "train")
    compiled_model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend=counter)
    check = Checker(torch.float32, f"dynamic-{kind}-{mode}")
    frames = []
    for shape in [(2, 3, 11, 9), (3, 3, 16, 13), (4, 3, 9, 12)]:
        x = make_input(shape, torch.float32).requires_grad_(True)
        g = torch.randn(shape[0], 5, *shape[2:])
        out_e, grads_e = _run(eager, x, g)
        out_c, grads_c = _run(compiled, x, g)
        frames.append(counter.frame_count)
        check("output", out_c, out_e)
        _check_grads(check, eager, grads_c, grads_e, g.norm().item())
    assert frames[0] >= 1 and frames == [frames[0]] * 3, f"frames compiled after each shape: {frames} (a recompile)"
    _check_buffers(check, compiled_model, eager)


def test_compile_dynamic_inductor():
    """The same with inductor (eval, the factor pyramid): the generated code around the operator takes
    symbolic sizes."""
    model = small_model("ms").eval()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=True)
    check = Checker(torch.float32, "dynamic-inductor")
    with torch.no_grad():
        for shape in [(2, 3, 11, 9), (3, 3, 14, 15)]:
            x = make_input(shape, torch.float32)
            check("output", compiled(x), model(x))


@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_compile_under_autocast(kind):
    """fullgraph compile of the fused module under CPU bfloat16 autocast: no graph break, the eager module's
    output dtype and values (the same casts and kernels, so to bfloat16 rounding of the graph's order)."""
    model = small_model(kind).eval()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = make_input((2, 3, 11, 9), torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_c, out_e = compiled(x), model(x)
    assert out_c.dtype == out_e.dtype
    assert norm_err(out_c, out_e) <= 1e-2
