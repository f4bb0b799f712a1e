"""Which modules a pickle names, and which of them a fresh worker can import by name (the
caller's side only: ``modules_needed`` tells the zygote what to import before it forks, and
``not_importable`` which functions must travel by value).

A function pickles by reference, ``(module, name)``, and a worker of the default start (a
fork of the zygote, a fresh interpreter) imports that module to find it. That fails for a
module the caller did not get from its ``sys.path``::

    importlib.util.spec_from_file_location("cfg", "/configs/cfg.py")  # a config file, a plugin
    types.ModuleType("generated"); exec(code, generated.__dict__)   # code made at run time

(mmengine's ``Config`` loads Python config files the first way; so do plugin loaders, and
pytest with ``--import-mode=importlib``.) A fork of the caller has those modules, so
``start_method="fork"`` and mmengine's workers never noticed; a fresh worker said "No module
named 'cfg'" and the call failed. So before a call's function is sent, each module its pickle
names is looked up as a fresh interpreter would look it up (``sys.meta_path``'s finders, on
the caller's ``sys.path``, which workers get); one that is not found, or found as another
file, sends the function by value instead, as a script's functions are sent.

A verdict is kept per module object: a program makes it once per module, not once per call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from types import ModuleType

_verdicts: dict[str, tuple[int, bool]] = {}  # module name -> (id of the module, importable)
# A payload is read for module names up to this many bytes and opcodes (a function that
# carries a large table by value, a task's 8 MB array): its globals come first, and what a
# longer read would find, its workers import themselves.
SCAN_LIMIT = 4 << 20
SCAN_OPCODES = 10_000


def not_importable(names: Iterable[str]) -> list[str]:
    """Of the imported modules ``names``, those a fresh worker could not import by name.

    Example:
        >>> import json, types, sys
        >>> sys.modules["made_up"] = types.ModuleType("made_up")
        >>> not_importable(["json", "made_up"])
        ['made_up']
        >>> del sys.modules["made_up"]
    """
    return [name for name in names if name in sys.modules and not _importable(name)]


def _importable(name: str) -> bool:
    module = sys.modules.get(name)
    if module is None:
        return False
    known = _verdicts.get(name)
    if known is not None and known[0] == id(module):
        return known[1]
    verdict = _found_where_it_was(name, module)
    _verdicts[name] = (id(module), verdict)
    return verdict


def _found_where_it_was(name: str, module: ModuleType) -> bool:
    """Whether the import system, asked afresh, finds ``name`` where ``module`` came from."""
    spec = getattr(module, "__spec__", None)
    if spec is None:  # made at run time (types.ModuleType): nothing to find it by
        return False
    parent, _, last = name.rpartition(".")
    if spec.name != name:  # an alias its parent sets up as it loads (os.path is posixpath)
        return (
            bool(parent)
            and _importable(parent)
            and getattr(sys.modules[parent], last, None) is module
            and _importable(spec.name)
        )
    path = None
    if parent:
        if not _importable(parent):
            return False
        path = getattr(sys.modules[parent], "__path__", None)
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            found = find_spec(name, path)
        except Exception:  # a finder that cannot answer for this name: ask the next
            continue
        if found is not None:
            return _same_file(found.origin, spec.origin)
    return False


def _same_file(found: str | None, origin: str | None) -> bool:
    if found is None or origin is None or not os.path.isabs(origin):
        return True  # a namespace package, a builtin or frozen module: nothing to compare
    try:
        return os.path.samefile(found, origin)
    except OSError:
        return os.path.realpath(found) == os.path.realpath(origin)


def modules_needed(payload: bytes) -> list[str]:
    """The modules a worker imports to unpickle ``payload``: those its globals live in, and
    those cloudpickle rebuilds by name (``subimport``), as far as this process has them.

    Example:
        >>> import pickle, json
        >>> modules_needed(pickle.dumps(json.dumps))
        ['json']
    """
    payload = payload[:SCAN_LIMIT]  # the globals come first; a large buffer ends the scan
    if b"\x93" not in payload:
        return []  # no global in it (STACK_GLOBAL: 0x93)
    import pickletools  # 1-2 ms of imports: only for a payload that names globals

    found: list[str] = []
    strings: list[str] = []  # the strings pushed, in order (a global's module and name)
    memo: dict[int, str | None] = {}  # what was memoized: a string, or _IMPORTER
    last: str | None = None  # the string the last opcode pushed, if it pushed one
    importing = False  # the last global was cloudpickle's subimport: a module name follows
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(payload)):
            if count == SCAN_OPCODES:
                break
            name, pushed = opcode.name, None
            if isinstance(arg, str) and "UNICODE" in name:
                pushed = arg
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(arg if isinstance(arg, int) else -1)
                if pushed is _IMPORTER:  # cloudpickle's subimport again, memoized
                    pushed, importing = None, True
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg if isinstance(arg, int) else -1] = last
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, qualname = str(arg).split(" ", 1)
                else:
                    module, qualname = strings[-2:] if len(strings) >= 2 else ("", "")
                found.append(module)
                importing = qualname in ("subimport", "import_module")
                last = _IMPORTER if importing else None
                continue
            if pushed is not None:
                if importing:
                    found.append(pushed)
                    importing = False
                strings.append(pushed)
            if name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                last = pushed
    except Exception:  # a payload we cannot read through: the worker imports on its own
        pass
    return [
        name
        for name in dict.fromkeys(found)
        if name in sys.modules and name != "__main__" and not name.startswith("multitrack")
    ]


_IMPORTER = "\0import"  # stands for cloudpickle's subimport in modules_needed's memo
