"""'auto' by measurement (msfused/autotune.py, issue 11), on the CPU with a stand-in timer: the CPU's 'auto' is
made measured (``MEASURED_DEVICES``) over the candidates 'cpu' and 'triton' (Triton's interpreter), and the
timer returns times the test sets, calling the scratch step it is given (so that what measuring runs is
real). Which backend ran the user's call is observed through ``functional._run``. Includes cases where a
fused backend is fastest: an 'auto' that always took the reference would fail them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import msfused
from msfused import autotune, backends, functional

from .conftest import build_pair, norm_err


class StandInTimer:
    """Times per candidate (ms); calls the scratch step ``calls`` times; raises for names in ``fail``."""

    def __init__(self, times, calls=1, fail=()):
        self.times, self.calls, self.fail, self.asked = dict(times), calls, set(fail), []

    def __call__(self, fn, device, name):
        self.asked.append(name)
        if name in self.fail:
            raise RuntimeError(f"stand-in failure of {name}")
        for _ in range(self.calls):
            fn()
        return self.times[name]


@pytest.fixture
def measured(monkeypatch):
    """'auto' measured on the CPU over 'cpu' and 'triton'; an empty table; ran[-1] is the user's backend."""
    monkeypatch.setattr(autotune, "MEASURED_DEVICES", {"cpu"})
    monkeypatch.setitem(backends.AUTO_CANDIDATES, "cpu", ("cpu", "triton"))
    for var in (autotune.ENV_VAR, autotune.FILE_ENV_VAR, backends.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    ran = []
    real_run = functional._run

    def spy(x, branches, backend, spec, project=None):
        ran.append(backend)
        return real_run(x, branches, backend, spec, project)

    monkeypatch.setattr(functional, "_run", spy)
    autotune.clear()
    previous = autotune.set_timer(None)
    yield ran
    autotune.set_timer(previous)
    autotune.clear()


def _block(train=False, norm="batch"):
    naive, fused = build_pair("ms", 3, dict(scales=(1, 2), kernel_size=1, norm=norm, branch_channels=2),
                              torch.float32)
    return naive.train(train), fused.train(train)


X_SHAPE = (2, 3, 6, 5)


def _use(timer):
    autotune.set_timer(timer)
    return timer


def test_fastest_fused_backend_wins_without_grad(measured):
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}))
    naive, fused = _block()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        out = fused(x)
        assert measured[-1] == "triton" and sorted(timer.asked) == ["cpu", "reference", "triton"]
        assert norm_err(out, naive(x)) <= 1e-5
        fused(x)  # the same key: no measurement again
    assert measured[-1] == "triton" and len(timer.asked) == 3
    (choice,) = autotune.table().values()
    assert choice.backend == "triton" and choice.times_ms == {"cpu": 2.0, "triton": 1.0, "reference": 3.0}


def test_reference_wins_where_fastest_without_grad(measured):
    _use(StandInTimer({"cpu": 2.0, "triton": 1.5, "reference": 1.0}))
    _, fused = _block()
    with torch.no_grad():
        fused(torch.randn(X_SHAPE))
    assert measured[-1] == "reference"


def test_grad_keys_measure_fused_backends_only(measured):
    """Recording gradients: the reference (atomics on CUDA) is no candidate, however fast it would be."""
    timer = _use(StandInTimer({"cpu": 1.0, "triton": 5.0, "reference": 0.1}))
    naive, fused = _block()
    x = torch.randn(X_SHAPE, requires_grad=True)
    out = fused(x)
    assert measured[-1] == "cpu" and sorted(timer.asked) == ["cpu", "triton"]
    g = torch.randn_like(out)
    x_ref = x.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(naive(x_ref), x_ref, g)
    assert norm_err(gx, gx_ref, g.norm().item()) <= 1e-5


def test_grad_key_triton_fastest(measured):
    _use(StandInTimer({"cpu": 3.0, "triton": 2.0, "reference": 0.1}))
    _, fused = _block()
    fused(torch.randn(X_SHAPE, requires_grad=True))
    assert measured[-1] == "triton"


def test_opt_in_reference_in_training(measured, monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "any")
    _use(StandInTimer({"cpu": 1.0, "triton": 5.0, "reference": 0.1}))
    _, fused = _block()
    fused(torch.randn(X_SHAPE, requires_grad=True))
    assert measured[-1] == "reference"


def test_tie_goes_to_the_preferred(measured):
    _use(StandInTimer({"cpu": 1.0, "triton": 1.0, "reference": 1.0}))
    _, fused = _block()
    with torch.no_grad():
        fused(torch.randn(X_SHAPE))
    assert measured[-1] == "cpu"


def test_failing_candidate_dropped_with_one_warning(measured):
    timer = _use(StandInTimer({"cpu": 1.0, "triton": 2.0, "reference": 3.0}, fail={"cpu"}))
    naive, fused = _block()
    x = torch.randn(X_SHAPE)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused(x)
        fused(x)
    msgs = [str(w.message) for w in caught if "failed while being measured" in str(w.message)]
    assert len(msgs) == 1 and "'cpu'" in msgs[0] and "stand-in failure" in msgs[0]
    assert measured[-1] == "triton" and timer.asked.count("cpu") == 1
    assert norm_err(out, naive(x)) <= 1e-5
    (choice,) = autotune.table().values()
    assert "cpu" in choice.errors and "cpu" not in choice.times_ms


def test_every_candidate_failing_falls_back_to_the_reference(measured):
    _use(StandInTimer({}, fail={"cpu", "triton", "reference"}))
    naive, fused = _block()
    x = torch.randn(X_SHAPE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fused(x)
    assert measured[-1] == "reference" and norm_err(out, naive(x)) <= 1e-5


def test_key(measured):
    """A new key per shape, dtype, memory format, norm mode and grad; the same call measures once."""
    timer = _use(StandInTimer({"cpu": 1.0, "triton": 2.0, "reference": 3.0}, calls=0))
    _, fused = _block()
    x = torch.randn(X_SHAPE)
    variants = [
        lambda: fused(x),
        lambda: fused(x),  # same key
        lambda: fused(torch.randn(3, 3, 6, 5)),  # shape
        lambda: fused.double()(x.double()),  # dtype
        lambda: fused.float()(x.contiguous(memory_format=torch.channels_last)),  # memory format
        lambda: fused.train()(x),  # norms in train mode
    ]
    counts = []
    with torch.no_grad():
        for v in variants:
            v()
            counts.append(len(autotune.table()))
    fused.eval()(x.requires_grad_(True))  # grad recorded
    counts.append(len(autotune.table()))
    assert counts == [1, 1, 2, 3, 4, 5, 6], counts
    keys = list(autotune.table())
    assert any("channels_last" in k or "|cl|" in k for k in keys) and any("grad=True" in k for k in keys)
    assert len(timer.asked) == 3 * 5 + 2


def test_eager_key_is_the_traced_key(monkeypatch):
    """The eager key (formatted once per distinct call, looked up by what it is made of) is the text the
    traced path formats, for every part of the key, and tells apart what the key must: a stride-only change
    of layout, a norm's mode, a projection's norm."""
    _, fused = _block()
    proj = msfused.MultiScaleBlock(3, scales=(1, 2), branch_channels=2, norm="batch", project=dict(out_channels=4))
    x = torch.randn(X_SHAPE)
    calls = [(x, fused, False), (x, fused, True), (x.contiguous(memory_format=torch.channels_last), fused, False),
             (x[:, :, :, :4], fused, False), (x.transpose(2, 3), fused, False), (x.double(), fused, False),
             (x, proj, False)]
    modes = [lambda m: m.eval(), lambda m: m.train(),
             lambda m: setattr(m.branches[0].norm, "running_mean", None) or m.eval()]
    seen = set()
    for mode in modes:
        for xi, m, grad in calls:
            mode(m)
            args = (xi, m.spec, m.branches, grad, m.project)
            eager = autotune.key(*args)
            assert autotune.key(*args) is eager  # the second call looks it up
            with monkeypatch.context() as patched:
                patched.setattr(torch.compiler, "is_compiling", lambda: True)
                assert autotune.key(*args) == eager
            assert eager not in seen, eager
            seen.add(eager)
    assert len(seen) == len(calls) * len(modes), "calls that differ got the same key"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast=torch.bfloat16" in autotune.key(x, fused.spec, fused.branches, False, None)


def test_no_timing_while_tracing_or_capturing(measured, monkeypatch):
    """Under torch.compile / export (is_compiling) or CUDA graph capture: the cached choice, else the fixed
    order; nothing timed."""
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    _, fused = _block()
    x = torch.randn(X_SHAPE)
    for flag in ("_tracing", "_capturing"):
        autotune.clear()
        timer.asked.clear()
        monkeypatch.setattr(autotune, flag, lambda *a: True)
        with torch.no_grad():
            fused(x)
        assert measured[-1] == "cpu" and timer.asked == [] and autotune.table() == {}  # fixed order
        monkeypatch.setattr(autotune, flag, lambda *a: False)
        with torch.no_grad():
            fused(x)  # eager: measured
        assert measured[-1] == "triton"
        monkeypatch.setattr(autotune, flag, lambda *a: True)
        asked = len(timer.asked)
        with torch.no_grad():
            fused(x)
        assert measured[-1] == "triton" and len(timer.asked) == asked  # the cached choice
        monkeypatch.setattr(autotune, flag, lambda *a: False)


def test_env_switch_fixed_order(measured, monkeypatch):
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 0.5}))
    _, fused = _block()
    monkeypatch.setenv(autotune.ENV_VAR, "0")
    with torch.no_grad():
        fused(torch.randn(X_SHAPE))
    assert measured[-1] == "cpu" and timer.asked == []
    monkeypatch.setenv(autotune.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=autotune.ENV_VAR):
        fused(torch.randn(X_SHAPE))


def test_save_and_load(measured, tmp_path, monkeypatch):
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    _, fused = _block()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        fused(x)
    path = tmp_path / "table.json"
    autotune.save(str(path))
    saved = autotune.table()
    autotune.clear()
    assert autotune.load(str(path)) == 1 and autotune.table() == saved
    with torch.no_grad():
        fused(x)
    assert measured[-1] == "triton" and len(timer.asked) == 3  # nothing measured again
    assert "triton" in autotune.report() and "1.000 ms" in autotune.report()
    # MSFUSED_AUTOTUNE_FILE: loaded on first use
    autotune.clear()
    monkeypatch.setattr(autotune, "_loaded_env_file", [])
    monkeypatch.setenv(autotune.FILE_ENV_VAR, str(path))
    assert "triton" in autotune.report()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "msfused": "0.0.0", "torch": "x",
                                                                "gpus": [], "entries": {}}),
                                     json.dumps({"format": 1, "entries": {"k": {"backend": "nope"}}}), None])
def test_bad_or_stale_table_warns_and_measures_again(measured, tmp_path, content):
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the table"):
        assert autotune.load(str(path)) == 0
    _, fused = _block()
    with torch.no_grad():
        fused(torch.randn(X_SHAPE))
    assert len(timer.asked) == 3 and measured[-1] == "triton"


def test_measuring_touches_no_running_statistics_and_draws_no_rng(measured):
    """Training mode: the scratch runs (3 per candidate) update copies; the module's running statistics get
    exactly the user's one call, as the naive module's; the RNG state is unchanged."""
    _use(StandInTimer({"cpu": 1.0, "triton": 2.0}, calls=3))
    naive, fused = _block(train=True)
    x = torch.randn(X_SHAPE, requires_grad=True)
    state = torch.random.get_rng_state()
    out = fused(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    ref = naive(x.detach())
    assert norm_err(out, ref) <= 1e-5
    for (n, a), (_, b) in zip(fused.named_buffers(), naive.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert int(a) == int(b), n
        else:
            assert norm_err(a, b) <= 1e-5, n


def test_warmup_fills_both_keys_and_leaves_the_model(measured):
    _use(StandInTimer({"cpu": 1.0, "triton": 2.0, "reference": 3.0}, calls=1))
    _, fused = _block(train=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), fused)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = msfused.autotune.warmup(model, torch.randn(X_SHAPE))
    assert len(autotune.table()) == 2 and "grad=True" in text and "grad=False" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_info_shows_the_choices(measured, capsys):
    from msfused.__main__ import info

    _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    _, fused = _block()
    with torch.no_grad():
        fused(torch.randn(X_SHAPE))
    info()
    out = capsys.readouterr().out
    assert "autotune (MSFUSED_AUTOTUNE=1): 1 key(s)" in out and ": triton (triton 1.000 ms" in out


def test_cpu_not_measured_by_default(monkeypatch):
    """Without the test seam the CPU's 'auto' is 'cpu', unmeasured."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    autotune.clear()
    timer = StandInTimer({})
    previous = autotune.set_timer(timer)
    try:
        _, fused = _block()
        with torch.no_grad():
            fused(torch.randn(X_SHAPE))
    finally:
        autotune.set_timer(previous)
    assert timer.asked == [] and autotune.table() == {}


def test_torch_compile_uses_the_cached_choice(measured):
    """A real trace (fullgraph): the eagerly measured choice is what the graph calls; with an empty table the
    fixed order, and nothing timed while tracing."""
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    naive, fused = _block()
    x = torch.randn(X_SHAPE)
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    with torch.no_grad():
        fused(x)  # eager: measured, triton kept
        torch._dynamo.reset()
        out = torch.compile(fused, fullgraph=True, backend=recording)(x)
    assert [t for t in targets if "msfused" in t] == ["msfused.multi_scale_inference_triton"], targets
    assert norm_err(out, naive(x)) <= 1e-5
    autotune.clear()
    targets.clear()
    asked = len(timer.asked)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(fused, fullgraph=True, backend=recording)(x)
    assert [t for t in targets if "msfused" in t] == ["msfused.multi_scale_forward"], targets  # 'cpu'
    assert len(timer.asked) == asked and autotune.table() == {}
    torch._dynamo.reset()


def _projected(train=False):
    torch.manual_seed(0)
    block = msfused.PyramidPooling(3, 2, bins=(1, 2), project=dict(out_channels=4, kernel_size=3, norm="batch"))
    return block.train(train)


def test_projection_has_its_own_key_and_candidates(measured):
    """A block with a projection is another key than the same branches without one (they share nothing to
    measure), and 'auto' measures its candidates (the projection's times are not the pyramid's)."""
    timer = _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}))
    plain = msfused.PyramidPooling(3, 2, bins=(1, 2)).eval()
    block = _projected()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        plain(x)
        assert measured[-1] == "triton"
        timer.times.update(cpu=1.0, triton=2.0)
        out = block(x)
    assert measured[-1] == "cpu" and len(autotune.table()) == 2 and len(timer.asked) == 6
    assert any("project=4,3," in k for k in autotune.table())
    with torch.no_grad(), msfused.use_backend("reference"):
        assert norm_err(out, block(x)) <= 1e-5


def test_projection_measuring_touches_no_running_statistics(measured):
    """Training mode with a projection: the scratch runs copy the projection too; its norm's running statistics
    get the user's one call only (as with nothing measured), and the projection's parameters count for grad."""
    _use(StandInTimer({"cpu": 1.0, "triton": 2.0}, calls=3))
    block = _projected(train=True)
    for p in block.branches.parameters():
        p.requires_grad_(False)  # only the projection's parameters record gradients
    unmeasured = _projected(train=True)
    x = torch.randn(X_SHAPE)
    out = block(x)
    assert measured[-1] == "cpu" and out.requires_grad
    assert all("grad=True" in k for k in autotune.table())
    with msfused.use_backend("cpu"):
        unmeasured(x)
    for (n, a), (_, b) in zip(block.named_buffers(), unmeasured.named_buffers()):
        assert torch.equal(a, b), n


def test_known_key_skips_the_candidate_checks(measured, monkeypatch):
    """After a key is measured, its calls look the choice up without re-checking every candidate (the per-call
    host cost of 'auto'); a loaded key's backend is checked once against what can run here."""
    _use(StandInTimer({"cpu": 2.0, "triton": 1.0, "reference": 3.0}, calls=0))
    _, fused = _block()
    x = torch.randn(X_SHAPE)
    checks = []
    real = backends._unsupported_reason
    monkeypatch.setattr(backends, "_unsupported_reason", lambda name, t: checks.append(name) or real(name, t))
    with torch.no_grad():
        fused(x)
        first = len(checks)
        fused(x)
    assert first == 2 and len(checks) == first and measured[-1] == "triton"
    # a table naming a backend that is no candidate here: not taken on trust, measured again
    (k,) = autotune.table()
    autotune.clear()
    with autotune._lock:
        autotune._table[k] = autotune.Choice("triton", {"triton": 1.0}, {})
    monkeypatch.setitem(backends.AUTO_CANDIDATES, "cpu", ("cpu",))
    with torch.no_grad():
        fused(x)
    assert measured[-1] in ("cpu", "reference") and autotune.table()[k].backend != "triton"
