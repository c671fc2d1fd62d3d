"""bench/gpu_check.sh (the GPU check, issue 11) cannot rot: its dry run on the CPU (``--smoke``: Triton under its
interpreter, tiny sizes, no build) runs every phase and writes every answer, and a case that fails or
raises is reported on its line without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msfused.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_check_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MSFUSED_BACKEND", "MSFUSED_AUTOTUNE")}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert [line.split(":")[0] for line in summary.splitlines()] == [
        "1. build", "2b. correctness (others)", "2a. correctness (triton)", "3. speed"], summary  # 2b beside 2a
    assert "commit " in (tmp_path / "env.txt").read_text()
    assert "backends:" in (tmp_path / "info.txt").read_text()
    # 2. one PASS line per case: 1 configuration x float64 x 2 formats, for triton (interpreted) and auto
    lines = (tmp_path / "correctness.txt").read_text().splitlines()
    for backend in ("triton", "auto"):
        mine = [line for line in lines if line.split()[1:2] == [backend] and line.split()[0] in ("PASS", "FAIL")]
        assert [line.split()[0] for line in mine] == ["PASS", "PASS"], lines
        assert {line.split()[3] for line in mine} == {"nchw", "channels_last"}
    report = json.loads((tmp_path / "correctness.json").read_text())
    assert report["counts"]["triton"] == {"PASS": 2}
    # 3. rows for naive, each backend and auto in both modes, torch.compile in inference; profiles; the commit
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["commit"] and result["environment"]["device"] == "cpu"
    got = {(r["mode"], r["impl"]) for r in result["rows"] if r["median_ms"] and not r["error"]}
    assert got == {(m, i) for m in ("inference", "train") for i in ("naive", "cpu", "auto")} | {("inference", "compiled")}
    naive_inference = [r for r in result["rows"] if r["impl"] == "naive" and r["mode"] == "inference"]
    assert len(naive_inference) == 1 and naive_inference[0]["speedup_vs_compiled"]
    assert {(p["mode"], p["impl"]) for p in result["profiles"] if p["kernels"]} == \
        {(m, i) for m in ("inference", "train") for i in ("naive", "cpu", "auto")}
    assert "psp_small" in (tmp_path / "table.txt").read_text()
    # the host profile of a fused backend's training step (the CPU backend here)
    assert [(h["mode"], h["impl"]) for h in result["host_profiles"]] == [("train", "cpu")]
    assert "function calls" in (tmp_path / "host_profile.txt").read_text()


def test_worker_reports_every_case(tmp_path, monkeypatch):
    """A case that raises and one that fails get their lines; the cases after them still run."""
    outcomes = iter([RuntimeError("boom"), {"status": "FAIL", "worst": "", "failures": ["output: err 1 > 1e-10"]}])

    def fake_check(cfg, dtype, fmt, backend, device, seed):
        outcome = next(outcomes, None)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome or {"status": "PASS", "worst": "output err 0", "failures": []}

    monkeypatch.setattr(gpu_check, "check_case", fake_check)
    # The worker sets process-wide numerics (TF32 off, Triton's NaN-poisoned buffers) for the GPU check's own
    # process; here they are put back afterwards, so later tests in this process see the defaults.
    from msfused.triton import launch

    monkeypatch.setattr(launch, "POISON", launch.POISON)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    # (cuBLAS's flag is no attribute of its module object, which routes it through __getattr__ / __setattr__:
    # pytest >= 9.2's monkeypatch would delete it on undo, which fails and leaves the other undos undone)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    lines = tmp_path / "lines.txt"
    args = gpu_check.parser().parse_args(
        ["_worker", "--device", "cpu", "--backend", "reference", "--shard-dtype", "float64", "--lines", str(lines),
         "--configs", "2", "--seed", "0", "--dtypes", "float64", "--max-hw", "9", "--chunk", "0", "--chunks", "1"])
    try:
        assert gpu_check._worker(args) == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    got = lines.read_text().splitlines()
    assert [line.split()[0] for line in got] == ["ERROR", "FAIL", "PASS", "PASS"], got
    assert "RuntimeError: boom" in got[0] and "output: err 1 > 1e-10" in got[1]


def test_configs_cover_the_grid():
    """24 configurations cover factor and bins, every down and up mode, k 1 and 3, no norm and BatchNorm in
    train and eval mode."""
    configs = gpu_check.make_configs(24, 0)
    kw = [c["kwargs"] for c in configs]
    assert {c["kind"] for c in configs} == {"ms", "psp"}
    assert {k["down_mode"] for k in kw if "down_mode" in k} == {"avg", "bilinear", "nearest"}
    assert {k["up_mode"] for k in kw} == {"bilinear", "nearest"}
    assert {k["kernel_size"] for k in kw} == {1, 3}
    assert {(k["norm"], c["train"]) for k, c in zip(kw, configs)} == {(n, t) for n in ("batch", None) for t in (0, 1)}
    assert gpu_check.make_configs(24, 0) == configs  # seeded
    # maps over one tile of the CUDA kernels (2,048 outputs), so that their multi-tile paths run on the GPU
    assert sum(c["shape"][2] * c["shape"][3] > 2048 for c in configs) >= 3
    assert torch.float64 in gpu_check.DTYPES.values()


@pytest.mark.parametrize("early, late, status, draws", [(3.0, 0.1, "PASS", gpu_check.HALF_DRAWS_AGAIN),
                                                    (3.0, 3.0, "FAIL", gpu_check.HALF_DRAWS_AGAIN),
                                                    (0.5, 3.0, "PASS", gpu_check.HALF_DRAWS)])
def test_half_precision_case_drawn_again_where_three_draws_fail(monkeypatch, early, late, status, draws):
    """A bfloat16 case over its limit on the mean of 3 draws (gpu_check.HALF_DRAWS) is drawn again and judged on
    the mean of 24 (HALF_DRAWS_AGAIN); one within it stops at 3; a float32 case takes one draw. The error metric is
    scripted: the naive module's err is 1 (limit 2.001), the fused one's ``early`` for the first 3 draws, then
    ``late``."""
    from msfused.bench import accuracy

    cfg = gpu_check.make_configs(1, 0, max_hw=9)[0]
    counted = [0]

    def counting(a, b, scale=None):
        counted[0] += 1
        return 0.0

    # the tensors one draw measures (fused and naive each): a float32 case, one draw
    monkeypatch.setattr(accuracy, "norm_err", counting)
    assert gpu_check.check_case(cfg, torch.float32, "nchw", "reference", torch.device("cpu"), 0)["status"] == "PASS"
    per_draw = counted[0] // 2
    assert per_draw > 0
    calls = [0]

    def scripted(a, b, scale=None):  # check_case measures the fused tensor, then the naive one, per tensor
        calls[0] += 1
        draw = (calls[0] - 1) // (2 * per_draw)
        return (early if draw < gpu_check.HALF_DRAWS else late) if calls[0] % 2 else 1.0

    monkeypatch.setattr(accuracy, "norm_err", scripted)
    result = gpu_check.check_case(cfg, torch.bfloat16, "nchw", "reference", torch.device("cpu"), 0)
    assert calls[0] == 2 * per_draw * draws, (calls[0], per_draw)
    assert result["status"] == status, result
    if status == "FAIL":
        want = f"mean of {gpu_check.HALF_DRAWS_AGAIN} draws"
        assert all(want in f for f in result["failures"]), result["failures"]


def test_speed_starts_again_without_an_implementation_that_broke_the_device(tmp_path, monkeypatch):
    """A sticky device error (stand-in: the CPU backend 'breaks the device' in its first call) would fail every
    later group of the speed phase: the group is dropped, the phase restarts itself from results.json without
    that implementation, and 'auto' chooses among the rest; naive and 'auto' are measured in every group."""
    from msfused import backends, functional

    broken = []
    real_run = functional._run

    def run(x, branches, backend, spec, project=None):
        if backend == "cpu":
            broken.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered (stand-in)")
        return real_run(x, branches, backend, spec, project)

    monkeypatch.setattr(functional, "_run", run)
    monkeypatch.setattr(gpu_check, "_device_broken", lambda device: bool(broken))
    restarts = []
    monkeypatch.setattr(gpu_check, "_restart", restarts.append)
    argv = ["speed", "--device", "cpu", "--out", str(tmp_path), "--workloads", "psp_small", "--n", "2",
            "--dtype", "float32", "--backends", "cpu,auto", "--compile-workloads", "", "--warmup", "1", "--reps", "2",
            "--max-seconds", "0.1", "--budget", "600"]
    candidates = dict(backends.AUTO_CANDIDATES)
    assert gpu_check.main(argv) == 1
    assert len(restarts) == 1 and restarts[0][:len(argv)] == argv
    child = restarts[0]
    assert child[child.index("--exclude") + 1] == "cpu" and float(child[child.index("--deadline") + 1]) > 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] == [] and result["done"] == []  # the broken group dropped, to be measured again
    assert [(b["group"], b["impl"]) for b in result["broken"]] == [("psp_small inference", "cpu")]
    assert "illegal memory access" in result["broken"][0]["error"]

    broken.clear()  # the fresh process: the device works again
    assert gpu_check.main(child) == 1  # (1: something broke during the phase)
    assert backends.AUTO_CANDIDATES == candidates  # restored after the phase
    assert len(restarts) == 1
    result = json.loads((tmp_path / "results.json").read_text())
    got = {(r["mode"], r["impl"]) for r in result["rows"] if r["median_ms"] and not r["error"]}
    assert got == {(m, i) for m in ("inference", "train") for i in ("naive", "auto")}
    assert result["done"] == ["psp_small inference", "psp_small train"] and len(result["broken"]) == 1
    assert not broken  # 'auto' no longer ran the excluded backend
