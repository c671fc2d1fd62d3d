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
from msfused.bench import cli, floor, report, runner, timing, workloads


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
        "psp_head_mmseg", "psp_decoder_smp",
    ]
    head = workloads.WORKLOADS["psp_head_mmseg"].make_naive("meta")
    assert head.spec.project.kernel_size == 3 and head.project.conv.weight.shape == (512, 4096, 3, 3)
    assert head.out_channels == 512
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


def test_memory_rates_are_the_best_over_buffer_sizes(monkeypatch) -> None:
    """The read and write rates: the best over the CPU's buffer sizes (a cache holding a workload-sized
    buffer makes it faster than the largest one; a floor must not be beaten), one timing per size."""
    monkeypatch.setitem(floor._MEMORY_BYTES, "cpu", (2**20, 4 * 2**20))
    for measure in (floor.measure_read_gbps, floor.measure_write_gbps):
        times = [0.1, 0.2]  # ms: the 4 MiB buffer moves twice the bytes per ms of the 1 MiB one
        monkeypatch.setattr(floor, "best_ms", lambda fn, device, warmup, reps: times.pop(0))
        assert measure("cpu") == pytest.approx(4 * 2**20 / 0.2e-3 / 1e9)
        assert times == []


def test_floor_counts_image_pooling_grad_x_as_a_broadcast() -> None:
    """aspp_pool's training step writes x's gradient as a broadcast of N x C values (autograd's image-pooling
    backward, as ATen's mean's), so the floor counts those, not a full map."""
    w = workloads.WORKLOADS["aspp_pool"]  # C=2048, 64x64, bins 1 to 256 channels, BN, x not in the output
    n, C, P = 2, 2048, 256
    out = n * P * 64 * 64 * 4
    params = (P * C + 2 * P) * 4  # conv weight, norm weight and bias
    running_stats = 2 * P * 4 + 8
    train = floor.count_work(w, n, "train", torch.float32)
    assert train.write_bytes == out + n * C * 4 + params + running_stats


def test_floor_counts_psp_small_by_hand() -> None:
    w = workloads.WORKLOADS["psp_small"]  # N=8, C=64, 32x32, bins 1,2,3,6 to 16 channels, BN, input first
    x = 8 * 64 * 32 * 32 * 4
    out = 8 * (64 + 4 * 16) * 32 * 32 * 4
    weights = 4 * 16 * 64 * 4
    norms = 4 * (4 * 16 * 4 + 8)  # weight, bias, running mean, running var (float32) + num_batches_tracked
    conv_flops = 2 * 8 * 16 * 64 * (1 + 4 + 9 + 36)
    inference = floor.count_work(w, 8, "inference", torch.float32)
    assert inference == floor.Work(x + weights + norms, out, conv_flops)
    assert inference.bytes == x + weights + norms + out
    params = weights + 4 * 2 * 16 * 4  # conv weights, norm weights and biases
    running_stats = 4 * (2 * 16 * 4 + 8)  # what a training step updates
    train = floor.count_work(w, 8, "train", torch.float32)
    assert train.flops == 3 * conv_flops
    assert train.read_bytes == x + weights + norms + out  # x, the state, the upstream gradient
    assert train.write_bytes == out + x + params + running_stats  # output, grad x, grads, running stats
    # Reads at the read rate, then writes at the write rate; or the FLOPs, whichever takes longer.
    rates = floor.Rates("cpu", "float32", read_gbps=20.0, write_gbps=10.0, matmul_tflops=1.0)
    assert floor.floor_ms(floor.Work(10**9, 0, 0), rates) == pytest.approx(50.0)
    assert floor.floor_ms(floor.Work(10**9, 10**9, 0), rates) == pytest.approx(150.0)
    assert floor.floor_ms(floor.Work(10**9, 10**9, 10**12), rates) == pytest.approx(1000.0)


def test_floor_counts_a_projection_by_its_parts() -> None:
    """psp_decoder_smp: the projection's x part at full size and each branch's part at its level (not the
    convolution over the concatenation)."""
    w = workloads.WORKLOADS["psp_decoder_smp"]  # C=128, 64x64, bins 1,2,3,6 to 32, projection 1x1 to 512
    block = 2 * 4 * 32 * 128 * (1 + 4 + 9 + 36)
    projection = 2 * 4 * 512 * 128 * 64 * 64 + 2 * 4 * 512 * 32 * (1 + 4 + 9 + 36)
    assert floor.count_work(w, 4, "inference", torch.float32).flops == block + projection


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
        # as a user runs it: not as a pytest-xdist worker (PYTEST_XDIST_WORKER makes pytest-benchmark disable itself)
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and all("test_bench_workloads.py::test_workload[" in line for line in collected), done.stdout
    assert "deselected" in done.stdout and "skipped" not in done.stdout


TINY = ["--device", "cpu", "--workloads", "psp_small", "--mode", "inference", "--n", "2", "--reps", "2",
        "--warmup", "1", "--no-memory"]


def test_cli_without_a_fused_backend_says_so_and_fails(tmp_path, capsys, monkeypatch) -> None:
    """A run that finds no fused backend (an extension that did not load) times the naive block, says so in
    the table's header and exits 1; --naive-only asks for exactly that and exits 0."""
    monkeypatch.setattr(runner, "fused_backends", lambda device: {"cpu": "the extension msfused._C is not loaded"})
    assert cli.main([*TINY, "--out", str(tmp_path / "a")]) == 1
    out = capsys.readouterr().out
    assert "NO FUSED BACKEND: none can run on cpu (cpu: the extension msfused._C is not loaded)" in out
    assert [r["impl"] for r in json.loads((tmp_path / "a" / "results.json").read_text())["rows"]] == ["naive"]

    assert cli.main([*TINY, "--naive-only", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "fused backends: not run (--naive-only)" in out and "NO FUSED BACKEND" not in out
    assert cli.main([*TINY, "--naive-only", "--impl", "cpu"]) == 2


def test_header_names_implementations_and_warns_when_busy() -> None:
    env = {"device": "cpu", "device_name": "a CPU", "torch": "t", "triton": None, "msfused": "m",
           "loadavg": [0.1, 0.1, 0.1], "loadavg_after": [0.5], "cpu_count": 2, "threads": 2, "other_cpu_load": 0.9,
           "fused_backends": {"cpu": ""}}
    rates = [{"dtype": "float32", "read_gbps": 20.0, "write_gbps": 10.0, "matmul_tflops": 0.1}]
    rows = [{"impl": impl} for impl in ("naive", "compiled", "cpu")]
    lines = report.header_lines({"environment": env, "rates": rates, "rows": rows})
    assert "floor rates (float32): read 20 GB/s, write 10 GB/s, matmul 0.1 TFLOP/s" in lines
    assert "impl: naive = eager naive (PyTorch), compiled = torch.compile naive, cpu = msfused (cpu backend)" in lines
    assert any(line.startswith("warning: other processes kept 0.9 of the 2 CPUs busy") for line in lines), lines
    quiet = report.header_lines({"environment": {**env, "other_cpu_load": 0.05}, "rates": rates, "rows": rows})
    assert not any(line.startswith("warning") for line in quiet)


def test_compile_failure_is_one_readable_line() -> None:
    """A torch.compile failure in the backward (Inductor's message is often just 'AssertionError: ') is
    reported as one line naming the phase and the compiler's error."""

    def bw_compiler():  # named as the frame AOTAutograd compiles the backward graph in
        raise AssertionError("index is not a vector")

    try:
        try:
            bw_compiler()
        except AssertionError as inner:
            raise torch._dynamo.exc.BackendCompilerFailed(bw_compiler, inner, None) from inner
    except Exception as e:
        text = runner.error_text(e)
    assert text.startswith("torch.compile fails (a torch error): Inductor cannot compile the naive block's "
                           "backward graph: AssertionError: index is not a vector"), text
    assert "\n" not in text


def test_implementations_are_timed_interleaved() -> None:
    """One call of each implementation in turn, every repetition (a change in load hits them alike), the
    turn starting one implementation later each round (each follows every other equally often)."""
    calls = []
    fns = [lambda name=name: calls.append(name) for name in ("naive", "compiled", "cpu")]
    times = timing.time_interleaved(fns, "cpu", reps=4)
    assert calls == ["naive", "compiled", "cpu", "compiled", "cpu", "naive", "cpu", "naive", "compiled",
                     "naive", "compiled", "cpu"]
    assert [len(t) for t in times] == [4, 4, 4]
    assert timing.round_order(1, 5) == [0] and timing.round_order(0, 2) == []


def test_batch_size_per_workload(capsys) -> None:
    """``--n``: one N for every workload, ``name=N`` for some (the others keep their default), or both; the
    runner uses them (the issue's head figures: psp_head_mmseg at N = 1, psp_decoder_smp at its CPU N)."""
    heads = workloads.select(["psp_head_mmseg", "psp_decoder_smp"])
    assert cli.batch_sizes("psp_head_mmseg=1", heads) == {"psp_head_mmseg": 1}
    assert cli.batch_sizes("3", heads) == {"psp_head_mmseg": 3, "psp_decoder_smp": 3}
    assert cli.batch_sizes("3,psp_head_mmseg=1", heads) == cli.batch_sizes("psp_head_mmseg=1,3", heads) == {
        "psp_head_mmseg": 1, "psp_decoder_smp": 3}
    for bad, says in [("0", ">= 1"), ("psp_head_mmseg=0", ">= 1"), ("two", "not N or workload=N"),
                      ("nope=2", "unknown workload 'nope'"), ("psp_mmseg=2", "not among the workloads"), (",", "no batch")]:
        with pytest.raises(ValueError, match=says):
            cli.batch_sizes(bad, heads)
    assert cli.main(["--device", "cpu", "--workloads", "psp_small", "--n", "psp_smp=2"]) == 2
    assert "psp_smp is not among the workloads" in capsys.readouterr().err
    rates = {torch.float32: floor.Rates("cpu", "float32", read_gbps=20.0, write_gbps=10.0, matmul_tflops=0.1)}
    small = workloads.select(["psp_small", "psp_smp"])
    result = runner.run(small, modes=["inference"], impls=["naive"], n={"psp_small": 3}, warmup=0, reps=1,
                        memory=False, rates=rates)
    assert [(r["workload"], r["n"]) for r in result["rows"]] == [("psp_small", 3), ("psp_smp", small[1].cpu_n)]
