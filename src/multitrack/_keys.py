"""What a checkpoint keys on: a digest of each task's arguments, and the function's identity.

A resumed run must never hand back a result that belongs to other inputs, so a stored result is
found by the *content* of its task, not by its position (inputs get reordered, filtered,
extended between runs)::

    task arguments ──task_key──▶ 16-byte digest ──(+ occurrence)──▶ row of the journal
    fn ──function_identity──▶ ("module:qualname", digest of its code) ──▶ "fn changed" notice

``task_key`` feeds one ``blake2b(digest_size=16)`` with a canonical, type-tagged encoding:
``1``, ``1.0``, ``True``, ``"1"``, ``b"1"``, ``(1,)`` and ``[1]`` all differ; dicts and sets
are encoded from their items' digests in sorted order, so insertion order does not count
(it does not for ``==`` either); numpy arrays by dtype, shape and their C-ordered bytes, so
``zeros((2, 3))`` and ``zeros(6)`` differ. What it cannot encode exactly (an arbitrary
object, a structure deeper than ``MAX_DEPTH``, a cycle) gives ``None``: the caller then keys
the task by its position (``index_key``) and says so once. Never a constant, never a random
key and never ``hash()`` (salted per process for str): each of those is a known way for a
cache to return the wrong result or none (the research notes, section 1).

``function_identity`` digests the *instructions* of the function's code, with every constant
and name resolved (``dis``), and not the raw ``co_code``: so a line move, an edited comment or
docstring (never loaded by any instruction) and the file name leave it unchanged, while any
edit of the body changes it.

numpy is never imported here: arrays are recognised only when the caller has imported numpy
already (``sys.modules``).
"""

from __future__ import annotations

import dataclasses
import dis
import enum
import functools
import math
import mmap
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

try:  # hashlib's own blake2b, without loading OpenSSL (3 ms on a first call) for nothing
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b

__all__ = ["MAX_DEPTH", "Occurrences", "function_identity", "index_key", "task_key"]

MAX_DEPTH = 32  # nesting deeper than this (or a cycle) is not keyed
_BIG = 1 << 16  # buffers this large are fed to the digest directly, not copied first


class _Unkeyable(Exception):
    """Raised inside the encoder; ``task_key`` turns it into ``None``."""


def _digest() -> Any:
    return blake2b(digest_size=16)


def task_key(args: Any) -> bytes | None:
    """A 16-byte digest of a task's arguments, equal across processes and runs for equal
    inputs; ``None`` when they cannot be encoded exactly.

    Example:
        >>> task_key(("a.png", 3)) == task_key(("a.png", 3))
        True
        >>> len({task_key(v) for v in [1, 1.0, True, "1", b"1", (1,), [1]]})
        7
        >>> task_key({"b": 2, "a": 1}) == task_key({"a": 1, "b": 2})
        True
        >>> task_key(object()) is None
        True
    """
    hasher = _digest()
    out = bytearray()
    try:
        _encode(args, out, hasher, 0)
    except (_Unkeyable, RecursionError):
        return None
    hasher.update(out)
    return bytes(hasher.digest())


def index_key(index: int) -> bytes:
    """The key of a task that ``task_key`` cannot encode: its position. Tagged so that it
    never equals a content key.

    Example:
        >>> index_key(3) == index_key(3), index_key(3) == task_key(3)
        (True, False)
    """
    return bytes(blake2b(b"#index:%d" % index, digest_size=16).digest())


def _sub_digest(obj: Any, depth: int) -> bytes:
    hasher = _digest()
    out = bytearray()
    _encode(obj, out, hasher, depth)
    hasher.update(out)
    return bytes(hasher.digest())


def _length(n: int) -> bytes:
    return n.to_bytes(8, "little")


_PACK_DOUBLE = struct.Struct("<d").pack
_NAN = _PACK_DOUBLE(math.nan)


def _float_bytes(value: float) -> bytes:
    # The bits as they are, so 0.0 and -0.0 differ (atan2, copysign tell them apart); every
    # NaN is one NaN, so a NaN input keys the same in every run.
    return _NAN if value != value else _PACK_DOUBLE(value)


def _encode(obj: Any, out: bytearray, hasher: Any, depth: int) -> None:
    """Append the tagged encoding of ``obj`` to ``out`` (large buffers go to ``hasher``
    directly, after flushing ``out``: the digest is of the concatenation either way)."""
    kind = type(obj)
    if kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        out += b"s"
        out += _length(len(data))
        out += data
    elif kind is int:
        out += b"i"
        data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        out += _length(len(data))
        out += data
    elif kind is float:
        out += b"f"
        out += _float_bytes(obj)
    elif kind is tuple or kind is list:
        if depth >= MAX_DEPTH:
            raise _Unkeyable
        out += b"t" if kind is tuple else b"l"
        out += _length(len(obj))
        for item in obj:
            _encode(item, out, hasher, depth + 1)
    elif obj is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if obj else b"F"
    elif kind is bytes or kind is bytearray:
        out += b"b" if kind is bytes else b"B"
        out += _length(len(obj))
        _feed(obj, out, hasher)
    elif kind is dict or kind is set or kind is frozenset:
        _encode_unordered(obj, kind, out, depth)
    else:
        _encode_other(obj, kind, out, hasher, depth)


def _feed(data: Any, out: bytearray, hasher: Any) -> None:
    if len(data) < _BIG:
        out += memoryview(data)
    else:
        hasher.update(out)
        out.clear()
        hasher.update(data)


def _encode_unordered(obj: Any, kind: type, out: bytearray, depth: int) -> None:
    """Dicts and sets: the same content in any insertion order gives the same encoding."""
    if depth >= MAX_DEPTH:
        raise _Unkeyable
    if kind is dict:
        # Item digests sorted by the key's digest (the value's breaks ties between distinct
        # keys that encode alike, such as two NaN objects).
        items = sorted(
            (_sub_digest(k, depth + 1), _sub_digest(v, depth + 1)) for k, v in obj.items()
        )
        out += b"d"
        out += _length(len(items))
        for key_digest, value_digest in items:
            out += key_digest
            out += value_digest
        return
    digests = sorted(_sub_digest(item, depth + 1) for item in obj)
    out += b"S" if kind is set else b"Z"
    out += _length(len(digests))
    for item_digest in digests:
        out += item_digest


def _type_name(kind: type) -> bytes:
    return f"{kind.__module__}.{kind.__qualname__}".encode()


def _encode_other(obj: Any, kind: type, out: bytearray, hasher: Any, depth: int) -> None:
    """The less common types: paths, complex, enums, namedtuples, dataclasses, numpy."""
    if depth >= MAX_DEPTH:
        raise _Unkeyable
    # A path exists only once pathlib is imported: not imported here for it (4 ms with what
    # it imports, on the first call of a run with checkpoint=).
    pathlib = sys.modules.get("pathlib")
    if pathlib is not None and isinstance(obj, pathlib.PurePath):
        # pathlib's own classes by their bare name: their module moved in Python 3.13.
        own = kind.__module__.startswith("pathlib")
        out += b"p"
        _encode(kind.__qualname__ if own else _type_name(kind).decode(), out, hasher, depth + 1)
        _encode(str(obj), out, hasher, depth + 1)
    elif kind is complex:
        out += b"c"
        out += _float_bytes(obj.real)
        out += _float_bytes(obj.imag)
    elif isinstance(obj, enum.Enum):
        out += b"e"
        _encode(_type_name(kind).decode(), out, hasher, depth + 1)
        _encode(obj.name, out, hasher, depth + 1)
    elif isinstance(obj, tuple) and hasattr(kind, "_fields") and not getattr(obj, "__dict__", None):
        out += b"n"  # a namedtuple: its class and its items
        _encode(_type_name(kind).decode(), out, hasher, depth + 1)
        _encode(tuple(obj), out, hasher, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _encode_dataclass(obj, kind, out, hasher, depth)
    elif "numpy" in sys.modules:
        _encode_numpy(obj, sys.modules["numpy"], out, hasher)
    else:
        raise _Unkeyable


def _encode_dataclass(obj: Any, kind: type, out: bytearray, hasher: Any, depth: int) -> None:
    fields = [field.name for field in dataclasses.fields(obj)]
    extra = set(getattr(obj, "__dict__", {})) - set(fields)
    if extra:  # state that is not a field: not described by the fields alone
        raise _Unkeyable
    out += b"D"
    _encode(_type_name(kind).decode(), out, hasher, depth + 1)
    _encode([(name, getattr(obj, name)) for name in fields], out, hasher, depth + 1)


def _encode_numpy(obj: Any, np: Any, out: bytearray, hasher: Any) -> None:
    if type(obj) in (np.ndarray, np.memmap):
        array = obj
        out += b"A"
        out += _length(array.ndim)
        for size in array.shape:
            out += _length(size)
    elif isinstance(obj, np.generic):
        array = np.asarray(obj)
        out += b"a"
    else:
        raise _Unkeyable
    dtype = array.dtype
    if dtype.hasobject:  # the bytes would be pointers
        raise _Unkeyable
    described = str(dtype.descr) if dtype.fields is not None else dtype.str
    _encode(described, out, hasher, 0)
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    out += _length(len(data))
    _feed(data, out, hasher)


class Occurrences:
    """Numbers the tasks that share a key, in input order: the first gets 0, the next 1...

    Two equal inputs are two tasks (a simulation run twice with the same parameters is meant
    to give two results), so the journal stores per (key, occurrence). Memory stays flat on
    long inputs: a fixed Bloom filter (``bits`` bits) tells "certainly new" (occurrence 0,
    nothing kept) from "maybe seen", and only maybe-seen keys are counted exactly. A false
    "maybe" numbers a new key 1 instead of 0: it is the same for the same input sequence,
    and costs at worst a recomputation, never a wrong result (the key is the content).

    Example:
        >>> seen = Occurrences()
        >>> [seen.next(k) for k in [b"a" * 16, b"b" * 16, b"a" * 16]]
        [0, 0, 1]
    """

    def __init__(self, bits: int = 1 << 27) -> None:
        self._mask = bits - 1
        if bits & self._mask:
            raise ValueError(f"bits must be a power of two, not {bits}")
        # Anonymous memory, not a bytearray: its pages are zero until touched (a call of 50
        # tasks touches ~150 of its 4,096) and go back to the system when the filter is
        # dropped. A bytearray this size came from the heap once glibc's threshold for
        # mapping large blocks had risen, zeroed (all resident) and kept after it was freed:
        # a script making 700 checkpointed calls grew to 418 MB (26 MB now).
        self._filter = mmap.mmap(-1, bits // 8)
        self._counts: dict[bytes, int] = {}

    def next(self, key: bytes) -> int:
        """The occurrence number of this task (the count of earlier tasks with ``key``)."""
        mixed = int.from_bytes(key[:12], "little")
        mask, flags = self._mask, self._filter
        seen = True
        for bit in (mixed & mask, (mixed >> 32) & mask, (mixed >> 64) & mask):
            byte, flag = bit >> 3, 1 << (bit & 7)
            if not flags[byte] & flag:
                flags[byte] |= flag
                seen = False
        if not seen:
            return 0
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        return count


# -- the function's identity --------------------------------------------------------------

# Code flags that change what a call does; the others (CO_NESTED, 3.14's CO_HAS_DOCSTRING...)
# describe where or how the code was compiled.
_FLAGS = 0x04 | 0x08 | 0x20 | 0x80 | 0x100 | 0x200  # *args **kw gen coroutine iterable-coro agen


def function_identity(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """``("module:qualname", 16-byte digest of its code)``: the digest changes when the body
    is edited, not when the function moves, a comment or its docstring changes.

    ``functools.partial`` and multitrack's ``Spread`` are unwrapped (a partial's bound
    arguments count); a callable instance is its class's ``__call__``; defaults and closure
    values count where ``task_key`` can encode them (else their type); a builtin is its name.

    Example:
        >>> name, digest = function_identity(abs)
        >>> name, len(digest)
        ('builtins:abs', 16)
        >>> function_identity(function_identity)[0]
        'multitrack._keys:function_identity'
    """
    hasher = _digest()
    name = _identify(fn, hasher, 0)
    return name, bytes(hasher.digest())


def _identify(fn: Any, hasher: Any, depth: int) -> str:
    from multitrack.backends._wire import Spread

    if depth > 8:
        hasher.update(b"<deep>")
        return _name_of(fn)
    if isinstance(fn, Spread):
        return _identify(fn.fn, hasher, depth + 1)  # map(f, a, b) is starmap(f, zip(a, b))
    if isinstance(fn, functools.partial):
        hasher.update(b"partial:")
        hasher.update(_value_digest(fn.args))
        hasher.update(_value_digest(fn.keywords))
        return _identify(fn.func, hasher, depth + 1)
    if isinstance(fn, types.MethodType):
        hasher.update(b"method:" + _type_name(type(fn.__self__)))
        return _identify(fn.__func__, hasher, depth + 1)
    if isinstance(fn, types.FunctionType):
        hasher.update(_code_digest(fn.__code__, 0))
        hasher.update(_value_digest(fn.__defaults__))
        hasher.update(_value_digest(fn.__kwdefaults__))
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                cells.append(None)
        hasher.update(_value_digest(tuple(cells)))
        return _name_of(fn)
    if isinstance(fn, type):
        init = fn.__dict__.get("__init__")
        if isinstance(init, types.FunctionType):
            _identify(init, hasher, depth + 1)
        hasher.update(_type_name(fn))
        return _name_of(fn)
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None and wrapped is not fn:  # a wrapper names what it wraps
        hasher.update(b"wrapper:" + _type_name(type(fn)))
        return _identify(wrapped, hasher, depth + 1)
    call = next(
        (c.__dict__["__call__"] for c in type(fn).__mro__ if "__call__" in c.__dict__), None
    )
    if isinstance(call, types.FunctionType):  # a callable instance: its class's __call__
        _identify(call, hasher, depth + 1)
        return _name_of(type(fn))
    name = _name_of(fn)  # a builtin: its name is all there is
    hasher.update(name.encode())
    return name


def _name_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qualname is None:
        qualname = type(obj).__qualname__
    return f"{module}:{qualname}"


def _value_digest(value: Any) -> bytes:
    """A value that counts towards the identity: its key, or its type when it has none."""
    key = task_key(value)
    if key is None:
        return _type_name(type(value))
    return key


def _code_digest(code: types.CodeType, depth: int) -> bytes:
    """The instructions with their arguments resolved (constants, names, nested code), the
    arguments' shape and the flags that matter. Not ``co_code`` itself: the index of a
    constant moves when a docstring is added; not ``co_lnotab``/positions/file name."""
    hasher = _digest()
    nargs = code.co_argcount + code.co_kwonlyargcount
    shape = (
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags & _FLAGS,
        code.co_varnames[:nargs],
    )
    hasher.update(_value_digest(shape))
    for instruction in dis.get_instructions(code):
        hasher.update(instruction.opname.encode())
        value = instruction.argval
        if isinstance(value, types.CodeType):
            hasher.update(_code_digest(value, depth + 1) if depth < MAX_DEPTH else b"<deep code>")
        elif instruction.arg is None:
            hasher.update(b";")
        else:
            key = task_key(value)
            hasher.update(key if key is not None else repr(value).encode())
    return bytes(hasher.digest())
