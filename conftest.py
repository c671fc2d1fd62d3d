"""pytest's ``--benchmark`` option: run the benchmarks only.

Registered here, at the repository root, so that pytest sees it from the root and from ``bench/`` alike.
``pytest --benchmark`` is pytest-benchmark's ``--benchmark-only`` restricted to the benchmarks: the tests
that do not take the ``benchmark`` fixture are deselected (not listed as skipped), and run from the root
without paths it collects ``bench/`` only (``tests/``, the contract, has no benchmarks). What is benchmarked is set in ``bench/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="run the benchmarks only (bench/, timed by pytest-benchmark: --benchmark-only without the "
             "skipped non-benchmark tests)",
    )


def _benchmarking(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if not _benchmarking(config):
        return
    if config.getoption("benchmark_disable", default=False):
        raise pytest.UsageError("--benchmark runs the benchmarks timed: leave out --benchmark-disable")
    config.option.benchmark_only = True  # read by pytest-benchmark's own pytest_configure, which runs last
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:  # plain `pytest --benchmark` at the root
        config.args = [str(_ROOT / "bench")]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if not _benchmarking(config):
        return
    keep = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if "benchmark" not in getattr(item, "fixturenames", ())]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
