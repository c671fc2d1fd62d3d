"""msfused test suite (a package, so that its conftest helpers import as tests.conftest, distinct from bench/conftest.py)."""
