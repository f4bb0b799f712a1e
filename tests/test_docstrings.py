"""Every example in a docstring runs, and every public name has one.

The modules are those of the ``multitrack`` that is imported, wherever it comes from (``src/``
in a checkout, the installed wheel in CI), found with ``pkgutil.walk_packages``; a module that
needs an optional extra that is not installed (dask, ray) is skipped. One test per module,
run with the standard ``doctest`` module; the suite's guard then checks that the examples that
start workers leave nothing behind.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
import types
from typing import Any

import pytest

import multitrack as mt

# Modules that run something when imported: only ever executed, never imported.
NOT_IMPORTED = {"multitrack.__main__"}


# Modules that import a cluster engine: importing it changes this process for the tests that
# follow (distributed changes how exceptions pickle, Ray starts threads), so the marks send
# them to the end of the run, with the cluster tests (conftest).
ENGINE_MARKS = {
    f"{mt.__name__}.backends._dask": pytest.mark.dask,
    f"{mt.__name__}.backends._dask_cluster": pytest.mark.dask,
    f"{mt.__name__}.backends._ray": pytest.mark.ray,
}


def _module_names() -> list[Any]:
    found = pkgutil.walk_packages(mt.__path__, prefix=f"{mt.__name__}.")
    names = sorted([mt.__name__, *(info.name for info in found if info.name not in NOT_IMPORTED)])
    return [
        pytest.param(name, marks=ENGINE_MARKS[name]) if name in ENGINE_MARKS else name
        for name in names
    ]


MODULES = _module_names()


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == mt.__name__ or not missing:
            raise
        pytest.skip(f"{name} needs {missing}, which is not installed (an optional extra)")


class _Finder(doctest.DocTestFinder):
    """``DocTestFinder`` that finds a public function or class in the module that defines
    it, also when the package shows it as ``multitrack.X`` (``__init__._public`` renames
    ``__module__`` for reprs and tracebacks: the stock finder would then skip it in its own
    module, methods included, and report its examples at the wrong file and line)."""

    def __init__(self, defined_classes: set[str]) -> None:
        super().__init__(exclude_empty=True)
        self._defined = defined_classes

    def _from_module(self, module: Any, object: Any) -> bool:  # doctest's parameter names
        if getattr(object, "__module__", None) == mt.__name__:
            if inspect.isfunction(object):
                return object.__globals__ is module.__dict__
            if inspect.isclass(object):
                return object.__qualname__.split(".")[0] in self._defined
        return bool(super()._from_module(module, object))


def _classes_defined_in(module: types.ModuleType) -> set[str]:
    try:
        source = inspect.getsource(module)
    except OSError:  # no source installed: its classes are found where __module__ says
        return set()
    return {node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def _doctests(module: types.ModuleType) -> list[doctest.DocTest]:
    finder = _Finder(_classes_defined_in(module))
    return [test for test in finder.find(module) if test.examples]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = _import(name)
    for public in mt.__all__:  # the lazy names: bound (and renamed) as a user would see them
        getattr(mt, public)
    tests = _doctests(module)
    skipped = [test.name for test in tests for ex in test.examples if ex.options.get(doctest.SKIP)]
    assert not skipped, f"examples marked +SKIP (every example must run): {skipped}"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    print(f"{name}: {results.attempted} examples in {len(tests)} docstrings")


def test_every_public_name_has_an_example() -> None:
    missing = []
    for name in mt.__all__:
        doc = inspect.getdoc(getattr(mt, name)) or ""
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"no runnable example (>>>) in the docstring of {missing}"


def test_every_module_that_imports_an_engine_is_marked() -> None:
    # Found by importing each module in a fresh interpreter: an unmarked one would run among
    # the other tests and change them (distributed makes unpicklable exceptions pickle).
    import subprocess
    import sys

    for name in [m if isinstance(m, str) else m.values[0] for m in MODULES]:
        probe = f"import {name}, sys; print('distributed' in sys.modules or 'ray' in sys.modules)"
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=False
        )
        if done.stdout.strip() == "True":
            assert name in ENGINE_MARKS, f"{name} imports a cluster engine: add it to ENGINE_MARKS"
