"""``python -m msfused info``, and importing msfused when its extension is missing, built for another torch,
or broken: msfused still imports, warns once with the reason, and runs the reference composition."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import msfused

PACKAGE_DIR = Path(msfused.__file__).resolve().parent


def _run(args, cwd=None, env_extra=None, timeout=240):
    env = dict(os.environ)
    env.pop("MSFUSED_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_info_lists_every_backend():
    r = _run(["-m", "msfused", "info"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith(f"msfused {msfused.__version__}") for line in lines), r.stdout
    assert f"torch {torch.__version__}" in r.stdout
    assert "extension msfused._C: loaded" in r.stdout
    # The CPU paths: the SIMD clone the loader picks is AVX-512 wherever ATen dispatches at AVX-512 (which needs
    # more of it than avx512f), and a half-precision dtype takes the micro-kernel exactly where _C says it runs.
    from msfused import _C

    paths = _C.cpu_paths()
    cpu_line = [line for line in lines if line.startswith("CPU kernels: SIMD clone ")]
    assert len(cpu_line) == 1, r.stdout
    if torch.backends.cpu.get_cpu_capability() == "AVX512" and "none" not in paths["simd"]:
        assert paths["simd"] == "avx512f", paths
    for dtype in ("bfloat16", "float16"):
        assert (f" {dtype} on oneDNN's micro-kernel" in cpu_line[0]) == (
            paths[f"{dtype}_ukernel"] and torch.backends.mkldnn.enabled), cpu_line[0]
    for name in msfused.BACKENDS:
        ok, why = msfused.availability(name)
        entry = [line for line in lines if line.strip().startswith(name + " ")]
        assert len(entry) == 1, f"backend {name!r} not listed once: {r.stdout}"
        assert ("unavailable: " + why) in entry[0] if not ok else entry[0].strip().endswith("available")


def test_cli_help_and_unknown_command():
    r = _run(["-m", "msfused"])
    assert r.returncode == 0 and "info" in r.stdout
    r = _run(["-m", "msfused", "frobnicate"])
    assert r.returncode == 2 and "frobnicate" in r.stderr


# ---------------------------------------------------------------------------------------------------
# A copy of the package without a usable extension, imported in a fresh interpreter.
# ---------------------------------------------------------------------------------------------------

PROBE = textwrap.dedent(
    r"""
    import json, sys, warnings
    # The editable install's finder would find the real extension beside the real sources; drop it so the
    # copy on sys.path is all there is.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in (getattr(h, "__module__", "") or "")]
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import msfused
        import msfused  # a second import does not warn again
        from msfused import _ops
        report = {"file": msfused.__file__, "loaded": _ops.loaded(), "error": _ops.load_error(),
                  "cpu": list(msfused.availability("cpu"))}
        naive = msfused.NaiveMultiScaleBlock(3, 4, norm="batch").double()
        fused = msfused.MultiScaleBlock(3, 4, norm="batch").double()
        fused.load_state_dict(naive.state_dict())
        x = torch.randn(2, 3, 9, 8, dtype=torch.double, requires_grad=True)
        outs = [fused(x) for _ in range(3)]
        ref = naive(x)
        report["equal"] = all(torch.equal(o, ref) for o in outs)
        outs[0].sum().backward()
        report["grad"] = x.grad is not None
        try:
            with msfused.use_backend("cpu"):
                fused(x)
            report["explicit_cpu"] = "no error"
        except RuntimeError as e:
            report["explicit_cpu"] = "RuntimeError: " + str(e)
    report["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    print("REPORT" + json.dumps(report))
    """
)

INFO = textwrap.dedent(
    r"""
    import sys, runpy
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in (getattr(h, "__module__", "") or "")]
    sys.argv = ["msfused", "info"]
    runpy.run_module("msfused", run_name="__main__")
    """
)


def _so_name() -> str:
    built = [p.name for p in PACKAGE_DIR.glob("_C*.so")]
    return built[0] if built else "_C.cpython-311-x86_64-linux-gnu.so"


def _fake_package(tmp_path: Path, variant: str) -> Path:
    root = tmp_path / variant
    shutil.copytree(PACKAGE_DIR, root / "msfused",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "_C.build.json", "__pycache__"))
    pkg = root / "msfused"
    assert not list(pkg.glob("_C*"))
    if variant == "other_torch":
        (pkg / _so_name()).write_bytes(b"")  # never loaded: the version check comes first
        (pkg / "_C.build.json").write_text(json.dumps({"torch": "0.0.0+elsewhere", "cuda": None}))
    elif variant == "broken":
        (pkg / _so_name()).write_bytes(b"this is not a shared library")
        (pkg / "_C.build.json").write_text(json.dumps({"torch": torch.__version__, "cuda": None}))
    return root


EXPECTED_REASON = {
    "missing": "not built",
    "other_torch": "built against torch 0.0.0+elsewhere",
    "broken": "failed to load",
}


@pytest.mark.parametrize("variant", ["missing", "other_torch", "broken"])
def test_import_without_usable_extension(tmp_path, variant):
    root = _fake_package(tmp_path, variant)
    r = _run(["-c", PROBE], cwd=root, env_extra={"PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("REPORT")]
    assert line, r.stdout + r.stderr
    report = json.loads(line[0][len("REPORT"):])
    assert Path(report["file"]).resolve().is_relative_to(root.resolve()), report["file"]
    assert report["loaded"] is False
    assert EXPECTED_REASON[variant] in report["error"], report["error"]
    load_warnings = [w for w in report["warnings"] if "fused kernels unavailable" in w]
    assert len(load_warnings) == 1, report["warnings"]
    assert load_warnings[0].startswith("RuntimeWarning") and EXPECTED_REASON[variant] in load_warnings[0]
    # 'auto' falls back to the reference with (at most) one warning over several calls.
    fallback = [w for w in report["warnings"] if "using the reference composition" in w and w not in load_warnings]
    assert len(fallback) <= 1, report["warnings"]
    assert report["equal"] is True and report["grad"] is True
    assert report["cpu"][0] is False and "not loaded" in report["cpu"][1]
    assert report["explicit_cpu"].startswith("RuntimeError") and "not loaded" in report["explicit_cpu"]

    info = _run(["-c", INFO], cwd=root, env_extra={"PYTHONPATH": str(root)})
    assert info.returncode == 0, info.stderr
    assert "extension msfused._C: not loaded" in info.stdout and EXPECTED_REASON[variant] in info.stdout
    for name in msfused.BACKENDS:
        assert any(ln.strip().startswith(name + " ") for ln in info.stdout.splitlines()), info.stdout
    assert "cpu        unavailable" in info.stdout


def test_source_tree_without_extension_runs_the_installed_msfused(tmp_path):
    """A clone's msfused/ without its extension, imported first from the current directory, shadows an
    installed msfused that has one: importing it says so, and ``python -m msfused`` runs the installed one."""
    clone = _fake_package(tmp_path, "missing")  # the clone: sources only
    site = tmp_path / "site"  # the installed package: sources and the built extension
    shutil.copytree(PACKAGE_DIR, site / "msfused", ignore=shutil.ignore_patterns("__pycache__"))
    installed = str((site / "msfused").resolve())
    imported = _run(["-c", "import msfused"], cwd=clone, env_extra={"PYTHONPATH": str(site)})
    assert f"shadows the installed msfused in {installed}" in imported.stderr, imported.stderr  # the warning
    r = _run(["-m", "msfused", "info"], cwd=clone, env_extra={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"running the installed msfused in {installed} instead" in r.stderr, r.stderr
    assert "fused kernels unavailable" not in r.stderr, r.stderr  # one note, not a warning and a note
    assert f"msfused {msfused.__version__} ({installed})" in r.stdout and "msfused._C: loaded" in r.stdout, r.stdout
