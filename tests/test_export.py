"""torch.export of a model with a fused block (issue 6): the exported program calls the fused operator (one
node, its fake kernel gives the shapes), runs with the eager model's numbers, with dynamic batch and map
sizes, in eval and train mode (running statistics updated as buffer mutations), and survives
torch.export.save / load. (The libtorch side: tests/test_cmake.py builds the CMake library and runs a C++
program that loads it, calls the operator and trains through it.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.export import Dim

from .conftest import Checker, make_input
from .test_compile import small_model

pytestmark = pytest.mark.slow


def _targets(ep) -> list:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["ms", "psp"])
def test_export_matches_eager(kind, mode, tmp_path):
    model = small_model(kind).train(mode == "train")
    exported_model = copy.deepcopy(model)
    x = make_input((2, 3, 11, 9), torch.float32)
    batch, height, width = Dim("batch", min=2, max=64), Dim("height", min=8, max=512), Dim("width", min=8, max=512)
    ep = torch.export.export(exported_model, (x,), dynamic_shapes=({0: batch, 2: height, 3: width},))
    targets = _targets(ep)
    assert any("msfused.multi_scale_forward" in t for t in targets), targets
    assert not any("upsample" in t or "avg_pool2d" in t for t in targets), targets
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    run = ep.module()  # in the mode it was exported in
    check = Checker(torch.float32, f"export-{kind}-{mode}")
    reference = copy.deepcopy(model)
    for shape in [(2, 3, 11, 9), (3, 3, 16, 13)]:
        x = make_input(shape, torch.float32)
        with torch.no_grad():
            want = reference(x)
            check("output", run(x), want)
    if mode == "train":  # the running statistics: updated by the exported program as by the module
        got = dict(run.named_buffers())
        for n, b in reference.named_buffers():
            if n.endswith("num_batches_tracked"):
                assert torch.equal(got[n], b), n
            else:
                check(n, got[n], b)
    else:
        x = make_input((2, 3, 12, 10), torch.float32)
        with torch.no_grad():
            check("output after save/load", loaded(x), model(x))
