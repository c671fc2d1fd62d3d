"""The launch plan (msfused/triton/plan.py, ``python -m msfused explain``): every workload of WORKLOADS.md,
inference and training, float32 and bfloat16, every autotune configuration, planned at its full size
from the real launchers without a GPU; no launch may leave the GPU idle behind a few long programs
(fewer than 2 x 132 programs running a serial loop of more than 1,024 steps). Figures are estimates.

The plan needs the GPU kernels' launch parameters, which Triton's interpreter (on for the test session,
tests/conftest.py) replaces: it is computed in one process of its own with the interpreter off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every workload's plan, and one explain command's JSON, from one process with the interpreter off.
_SURVEY = """
import contextlib, io, json, sys
import torch
from msfused.__main__ import main
from msfused.bench.floor import count_work
from msfused.bench.workloads import WORKLOADS
from msfused.triton import plan
rows = plan.survey()
for r in rows:
    w = WORKLOADS[r["workload"]]
    r["floor_bytes"] = count_work(w, w.n, r["mode"], getattr(torch, r["dtype"])).bytes
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["explain", "psp_small", "--mode", "train", "--dtype", "bfloat16", "--json"])
json.dump(dict(survey=rows, explain_rc=rc, explain=out.getvalue()), sys.stdout)
"""


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kw)


@pytest.fixture(scope="module")
def planned():
    proc = _run(["-c", _SURVEY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def survey(planned):
    return planned["survey"]


def test_every_workload_mode_and_dtype_is_planned(survey):
    from msfused.bench.workloads import WORKLOADS

    seen = {(r["workload"], r["mode"], r["dtype"]) for r in survey}
    assert seen == {(w, m, d) for w in WORKLOADS for m in ("inference", "train") for d in ("float32", "bfloat16")}
    for r in survey:
        # the forward's launch counts (README): factor pyramids 1, pyramid pooling 2 in inference
        if r["mode"] == "inference":
            expected = 1 if WORKLOADS[r["workload"]].block == "multi_scale" else 2
            assert r["launches"] == expected, r
        # the kernels move at least what the call must: x read, the output written (the bytes floor)
        assert r["est_us"] * 1e-6 >= r["floor_bytes"] / 3350e9 * 0.999, r


def test_no_launch_leaves_the_gpu_idle_behind_long_programs(survey):
    flagged = [(r["workload"], r["mode"], r["dtype"], f) for r in survey for f in r["flagged"]]
    assert not flagged, "\n".join(map(str, flagged))


def test_explain_command(planned):
    assert planned["explain_rc"] == 0
    plan = json.loads(planned["explain"])
    assert "estimate" in plan["note"]
    kernels = {lc["kernel"] for lc in plan["launches"]}
    assert {"levels_kernel", "convs_kernel", "up_adjoints_kernel", "wgrad_kernel", "dx_kernel"} <= kernels
    chosen = [lc for lc in plan["launches"] if lc["chosen"]]
    assert len(chosen) == plan["launch_count"] and plan["est_us"] == pytest.approx(sum(lc["est_us"] for lc in chosen))
    for lc in plan["launches"]:
        assert lc["programs"] == sum(p["programs"] for p in lc["parts"]) > 0
        assert lc["serial"] >= 1 and lc["lanes"] >= 1 and lc["read"] > 0 and lc["written"] > 0


def test_a_projection_the_plan_does_not_cover_is_named(survey):
    """The head workloads' plans cover the block alone today: the plan says so (plan.omitted: in the table as
    NOT PLANNED lines, and in the JSON) rather than passing the block's launches off as the whole call."""
    for row in survey:
        head = row["workload"] in ("psp_head_mmseg", "psp_decoder_smp")
        assert bool(row["omitted"]) == head, row["workload"]
        assert all("projection" in what for what in row["omitted"])
