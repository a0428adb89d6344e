"""Helpers shared by test directories (tests/agent, tests/adversarial, tests/kernel, tests/unit, tests/cni).

Imported as ``helpers.<module>``: tests/ is on sys.path because the rootdir conftest
(tests/conftest.py) is loaded with pytest's default ``prepend`` import mode, which puts
its directory first on sys.path before any test module is imported.
"""
