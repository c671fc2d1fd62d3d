"""DistributedDataParallel (issue 6): two processes on the gloo backend on CPU (tests/_ddp_worker.py) train a
small model with a multi-scale block for a few SGD steps (momentum) on halves of each batch.

  * fused under DDP ends with the parameters and buffers of naive under the same DDP run (float64: err
    <= 1e-10; float32: SPEC's 1e-5, with train-mode BatchNorm and without);
  * without BatchNorm, DDP over two half-batches equals one process over the whole batch (float32
    tolerance; float64 err <= 1e-10);
  * both ranks end identical (DDP keeps replicas in sync);
  * a third-party block converted in place (semseg's PPM look-alike) trains under DDP as the library's own;
  * a naive block whose norms became nn.SyncBatchNorm converts (SPEC.md): in eval mode it equals the naive
    one; in training mode inside the process group backend 'cpu' refuses it naming SyncBatchNorm, and 'auto'
    runs SyncBatchNorm itself (which on CPU raises its own error, as the naive block does; DDP runs
    SyncBatchNorm on GPU modules only). The CPU-only version: test_modules.py::
    test_convert_twin_with_batchnorm_subclass[sync_batchnorm].
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .conftest import norm_err

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1")
    env.pop("MSFUSED_BACKEND", None)
    last = None
    for _ in range(2):  # a port taken between choosing and binding it: try once more
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "_ddp_worker.py"), str(_free_port()), str(out)],
                           capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        if r.returncode == 0:
            break
        last = r
    else:
        pytest.fail(f"the DDP worker failed ({last.returncode}):\n{last.stdout[-4000:]}\n{last.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _tol(dtype: str) -> float:
    return 1e-10 if dtype == "torch.float64" else 1e-5


def _compare(a: dict, b: dict, tol: float, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            e = norm_err(a[k], b[k])
            assert e <= tol, f"{what}: {k}: err {e:.2e} > {tol:.0e}"
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}: {a[k]} != {b[k]}"


@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
@pytest.mark.parametrize("norm", ["batch", "None"], ids=["batchnorm", "no_norm"])
def test_ddp_fused_equals_naive(ddp_results, norm, dtype):
    for rank, res in enumerate(ddp_results):
        _compare(res[(dtype, norm, "fused")], res[(dtype, norm, "naive")], _tol(dtype), f"rank {rank}")
    # The replicas' parameters stay in sync. (Buffers are broadcast from rank 0 before each forward, then each
    # rank's running statistics take its own half-batch, as with the naive block: compared above per rank.)
    params = lambda res: {k: v for k, v in res[(dtype, norm, "fused")].items() if "running" not in k  # noqa: E731
                          and "num_batches" not in k}
    _compare(params(ddp_results[0]), params(ddp_results[1]), 0.0, "rank 0 vs 1")


@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_ddp_halves_equal_one_process_without_batchnorm(ddp_results, dtype):
    single = ddp_results[0][(dtype, "None", "single_process")]
    for rank, res in enumerate(ddp_results):
        _compare(res[(dtype, "None", "fused")], single, _tol(dtype), f"rank {rank}, DDP vs one process")


@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_ddp_thirdparty_block_fused_equals_its_own(ddp_results, dtype):
    for rank, res in enumerate(ddp_results):
        _compare(res[(dtype, "thirdparty", "fused")], res[(dtype, "thirdparty", "naive")], _tol(dtype),
                 f"rank {rank}, third-party block, fused vs its own forward")


def test_ddp_sync_batchnorm(ddp_results):
    for res in ddp_results:
        assert res["sync_block_type"] == "MultiScaleBlock"
        assert res["sync_eval_err"] <= 1e-10
        assert res["sync_train_cpu"].startswith("RuntimeError") and "SyncBatchNorm" in res["sync_train_cpu"], \
            res["sync_train_cpu"]
        assert res["sync_train_auto"] == res["sync_train_naive"] != "no error", res
