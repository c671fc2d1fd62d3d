"""README.md's first screen works as written: the example under "## Use it" runs and computes what it
says, and the main-job command installs what the chart needs (the ``bench`` extra) and the examples'
extra exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import msfused

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _extras() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_use_it_example_runs(capsys) -> None:
    code = _blocks(_section("Use it"), "python")[0]
    assert len(code.strip().splitlines()) <= 12, "the first example stays about ten lines"
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Use it)", "exec"), namespace)  # noqa: S102: the README's own code

    y, ref, model, x = namespace["y"], namespace["ref"], namespace["model"], namespace["x"]
    assert y.shape == (x.shape[0], 10, *x.shape[2:])
    y, ref = y.detach().double(), ref.detach().double()
    assert float(torch.dist(y, ref) / ref.norm()) <= 1e-5  # SPEC.md, float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(isinstance(m, msfused.PyramidPooling) for m in model.modules())
    assert "relative difference" in capsys.readouterr().out


def test_main_job_installs_what_the_chart_needs() -> None:
    commands = _blocks(_section("The two commands"), "bash")[0]
    main_job = next(line for line in commands.splitlines() if "python -m msfused bench" in line)
    extras = re.findall(r'"\.\[([\w,]+)\]"', main_job)
    assert extras and "bench" in extras[0].split(","), main_job
    declared = _extras()
    names = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower() for req in declared["bench"]}
    assert {"numpy", "matplotlib"} <= names, declared["bench"]
    assert any(req.startswith("scikit-learn") for req in declared["examples"]), declared
