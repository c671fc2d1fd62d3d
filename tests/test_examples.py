"""The examples in examples/ run, at a small size (issue 6):

  * digits_resnet.py: a multi-scale ResNet on scikit-learn's digits, naive and fused trained side by side
    from the same weights on the same batches: the same test accuracy (in float64, where the two runs agree
    to rounding; in float32 training amplifies rounding differences into a test image or two), well above
    chance, and both timed;
  * pspnet_head.py: a PSPNet-style model converted with msfused.convert: outputs (eval and train) and
    running statistics equal before and after, within SPEC.md's float32 tolerance.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"msfused_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_resnet(capsys):
    pytest.importorskip("sklearn", reason="scikit-learn ships the digits (pip install scikit-learn)")
    results = _load("digits_resnet").main(["--epochs", "3", "--samples", "600", "--width", "8", "--blocks", "1",
                                           "--batch-size", "32", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert "naive" in out and "fused" in out and "accuracy" in out
    naive, fused = results["naive"], results["fused"]
    # float64: the two trainings agree to rounding, so the predictions do (one test image of slack for a tie)
    assert abs(naive["accuracy"] - fused["accuracy"]) <= 1 / 150 + 1e-9, results  # 150 test images
    assert min(naive["accuracy"], fused["accuracy"]) >= 0.4, results  # chance is 0.1
    assert all(r["train_seconds"] > 0 and math.isfinite(r["train_seconds"]) for r in results.values())


def test_pspnet_head(capsys):
    results = _load("pspnet_head").main(["--size", "64", "--channels", "32", "--repeats", "1"])
    assert "msfused.convert" in capsys.readouterr().out
    for key in ("eval_err", "train_err", "ppm_err", "running_stats_err"):
        assert results[key] <= 1e-5, (key, results)
    assert results["eval_naive_ms"] > 0 and results["eval_fused_ms"] > 0


def test_digits_resnet_without_sklearn_says_what_it_needs(monkeypatch):
    """Without scikit-learn the digits example stops at once with one line naming what to install."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # None in sys.modules: `import sklearn` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as raised:
        _load("digits_resnet").main(["--epochs", "1", "--samples", "60"])
    message = str(raised.value.code)
    assert "scikit-learn" in message and ".[examples]" in message and "\n" not in message
