"""Sanity checks of ``msfused.bench`` itself: the CLI end to end on a tiny case, the workload table, and
the floor's counting rule on a case counted by hand. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msfused
from msfused.bench import cli, floor, runner, workloads


def test_cli_runs_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "bench-out"
    fused = runner.fused_impls("cpu")
    rc = cli.main([
        "--device", "cpu", "--workloads", "psp_small", "--mode", "inference,train", "--n", "2",
        "--reps", "2", "--warmup", "1", "--out", str(out),
    ])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["mode"], r["impl"]) for r in rows] == [
        (mode, impl) for mode in ("inference", "train") for impl in ["naive", *fused]
    ]
    for row in rows:
        assert row["error"] is None
        assert row["n"] == 2 and row["workload"] == "psp_small" and row["dtype"] == "float32"
        assert row["median_ms"] > 0 and row["floor_ms"] > 0 and row["gbps"] > 0
        assert row["torch"] == torch.__version__ and row["msfused"] == msfused.__version__
        assert row["err_vs_naive"] < 1e-4  # fused and naive compute the same block
    assert all(r["speedup_vs_naive"] == 1.0 for r in rows if r["impl"] == "naive")
    assert (out / "table.txt").exists()
    assert "psp_small" in capsys.readouterr().out
    # The chart: a real PNG whenever matplotlib is installed (the test requirements install it).
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_options(capsys) -> None:
    assert cli.main(["--workloads", "no_such_workload"]) == 2
    assert cli.main(["--device", "cpu", "--impl", "naive,warp_drive"]) == 2
    assert "warp_drive" in capsys.readouterr().err


def test_workload_table_matches_workloads_md() -> None:
    assert list(workloads.WORKLOADS) == [
        "psp_mmseg", "psp_smp", "aspp_pool", "pyramid_seed", "pyramid_wide", "stem_pyramid", "psp_small",
    ]
    smp = workloads.WORKLOADS["psp_smp"].make_naive("meta")
    assert [b.bias for b in smp.spec.branches] == [True, False, False, False]
    assert [b.norm for b in smp.spec.branches] == [None, "batch", "batch", "batch"]
    assert smp.spec.align_corners and smp.spec.input_position == "last"
    for w in workloads.WORKLOADS.values():
        assert 1 <= w.cpu_n <= w.n


def test_built_modules_share_weights_and_agree() -> None:
    built = workloads.build(workloads.WORKLOADS["psp_small"], n=2)
    naive_state, fused_state = built.naive.state_dict(), built.fused.state_dict()
    assert naive_state.keys() == fused_state.keys()
    assert all(torch.equal(naive_state[k], fused_state[k]) for k in naive_state)
    norm = built.naive.branches[1].norm
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))  # eval mode does real work
    with torch.inference_mode():
        assert runner.relative_error(built.fused(built.x), built.naive(built.x)) < 1e-5


def test_floor_counts_psp_small_by_hand() -> None:
    w = workloads.WORKLOADS["psp_small"]  # N=8, C=64, 32x32, bins 1,2,3,6 to 16 channels, BN, input first
    x = 8 * 64 * 32 * 32 * 4
    out = 8 * (64 + 4 * 16) * 32 * 32 * 4
    weights = 4 * 16 * 64 * 4
    norms = 4 * (4 * 16 * 4 + 8)  # weight, bias, running mean, running var (float32) + num_batches_tracked
    conv_flops = 2 * 8 * 16 * 64 * (1 + 4 + 9 + 36)
    assert floor.count_work(w, 8, "inference", torch.float32) == floor.Work(x + weights + norms + out, conv_flops)
    params = weights + 4 * 2 * 16 * 4  # conv weights, norm weights and biases
    running_stats = 4 * (2 * 16 * 4 + 8)  # what a training step updates
    train = floor.count_work(w, 8, "train", torch.float32)
    assert train.flops == 3 * conv_flops
    assert train.bytes == (x + weights + norms + out) + (out + x + params + running_stats)
    rates = floor.Rates("cpu", "float32", copy_gbps=10.0, matmul_tflops=1.0)
    assert floor.floor_ms(floor.Work(10**9, 0), rates) == pytest.approx(100.0)
    assert floor.floor_ms(floor.Work(0, 10**12), rates) == pytest.approx(1000.0)


def test_readme_results_are_generated_from_bench_results():
    """README.md's results section is exactly what bench/update_readme.py makes of bench/results/."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "update_readme.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("where", [".", "bench"])
def test_pytest_benchmark_option_collects_the_benchmarks_only(where) -> None:
    """``pytest --benchmark``, as the README says, from the root and from bench/: the benchmark cases only,
    the other tests deselected rather than skipped, tests/ not collected."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--benchmark", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root / where, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and all("test_bench_workloads.py::test_workload[" in line for line in collected), done.stdout
    assert "deselected" in done.stdout and "skipped" not in done.stdout
