"""Worker for tests/test_ddp.py: two processes (torch.multiprocessing, forked) on the gloo backend, CPU.

    python tests/_ddp_worker.py PORT OUT_DIR

Each rank trains, from the same initial weights, a small model with a multi-scale block for a few SGD steps
under DistributedDataParallel on its half of each batch: once with the naive block, once converted to the
fused one (msfused.convert), for a block with train-mode BatchNorm and one without; rank 0 also trains the
BatchNorm-free model in one process on the whole batch. Parameters and buffers afterwards are saved to
OUT_DIR/rank{r}.pt; the test compares them. The same for a third-party pyramid block (the look-alike of
hszhao/semseg's PPM, converted in place by msfused.convert). Also: a naive block whose norms became
nn.SyncBatchNorm converts; in eval mode it runs fused and equals the naive one ('sync_eval_err'); in
training mode inside the process group backend 'cpu' refuses it with a message naming SyncBatchNorm
('sync_train_cpu'), while 'auto' runs the reference, i.e. SyncBatchNorm itself, which on CPU tensors raises
its own error as the naive block does ('sync_train_auto', 'sync_train_naive').
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 3
WORLD = 2
BATCH = 8  # split into two halves of 4


def make_model(norm, dtype):
    import msfused

    torch.manual_seed(1234)
    block = msfused.NaiveMultiScaleBlock(4, 3, scales=(1, 2, 3), down_mode="bilinear", norm=norm, activation="silu")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), block, nn.Conv2d(block.out_channels, 5, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model.to(dtype)


def make_thirdparty_model(dtype):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests._thirdparty import semseg_lookalike

    torch.manual_seed(4321)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), semseg_lookalike()["PPM"](4, 2, (1, 2, 3)),
                          nn.Conv2d(10, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return model.to(dtype)


def data(dtype):
    g = torch.Generator().manual_seed(99)
    xs = [torch.randn(BATCH, 3, 11, 10, generator=g, dtype=torch.float64).to(dtype) for _ in range(STEPS)]
    ys = [torch.randint(0, 5, (BATCH,), generator=g) for _ in range(STEPS)]
    return xs, ys


def train(model, xs, ys, rank=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for x, y in zip(xs, ys):
        if rank is not None:  # this rank's half of the batch
            half = BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    inner = model.module if isinstance(model, DDP) else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def run(rank, port, out_dir):
    import msfused

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for dtype in (torch.float64, torch.float32):
            xs, ys = data(dtype)
            for norm in ("batch", None):
                for impl in ("naive", "fused"):
                    model = make_model(norm, dtype).train()
                    if impl == "fused":
                        msfused.convert(model)
                        assert type(model[1]) is msfused.MultiScaleBlock
                    results[(str(dtype), str(norm), impl)] = train(DDP(model), xs, ys, rank)
            if rank == 0:
                results[(str(dtype), "None", "single_process")] = train(make_model(None, dtype).train(), xs, ys)
            for impl in ("naive", "fused"):
                model = make_thirdparty_model(dtype).train()
                if impl == "fused":
                    assert all(r.converted for r in msfused.convert(model, report=True))
                results[(str(dtype), "thirdparty", impl)] = train(DDP(model), xs, ys, rank)
        # SyncBatchNorm (which DDP runs on GPU modules only).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(make_model("batch", torch.float64))
        naive = copy.deepcopy(model)
        msfused.convert(model, report=True)
        results["sync_block_type"] = type(model[1]).__name__
        x = data(torch.float64)[0][0]
        model.eval(), naive.eval()
        with torch.no_grad():
            results["sync_eval_err"] = ((model(x) - naive(x)).norm() / naive(x).norm()).item()
        model.train(), naive.train()
        for key, backend, m in (("sync_train_cpu", "cpu", model), ("sync_train_auto", "auto", model),
                                ("sync_train_naive", "auto", naive)):
            try:
                with msfused.use_backend(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m(x)
                results[key] = "no error"
            except (RuntimeError, ValueError) as e:
                results[key] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import msfused  # noqa: F401  imported once here: forked ranks inherit it (no op has run in this process yet)

    torch.set_num_threads(1)
    mp.start_processes(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True, start_method="fork")
