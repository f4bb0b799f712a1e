"""Task keys and the function's identity (``_keys``): equal inputs give equal keys in every
process, different inputs (by ``==`` or by type) never share one, and what cannot be encoded
exactly gives ``None``, never a constant."""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import math
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import types
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitrack._keys import MAX_DEPTH, Occurrences, function_identity, index_key, task_key
from multitrack.backends._wire import Spread

SAMPLES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**100,
    -(2**100),
    1.0,
    0.0,
    -0.0,
    float("nan"),
    float("inf"),
    1 + 2j,
    "",
    "1",
    "héllo \udc80",  # a lone surrogate (os.fsdecode of undecodable bytes)
    b"",
    b"1",
    bytearray(b"1"),
    (),
    (1,),
    [1],
    (1, "a", (2.5, None)),
    {"b": 2, "a": [1, 2]},
    {1, 2, 3},
    frozenset({1, 2, 3}),
    pathlib.PurePosixPath("a/b.png"),
    pathlib.Path("a/b.png"),
    b"x" * 200_000,  # fed to the digest directly, not copied
]


def test_keys_are_16_bytes_and_all_differ() -> None:
    keys = [task_key(value) for value in SAMPLES]
    assert all(isinstance(key, bytes) and len(key) == 16 for key in keys)
    assert len(set(keys)) == len(SAMPLES)


def test_keys_are_equal_in_another_process() -> None:
    # str hashing is salted per process: a key built on hash() would differ here.
    script = textwrap.dedent(
        """
        import pickle, sys
        from multitrack._keys import task_key
        values = pickle.loads(sys.stdin.buffer.read())
        print(" ".join(task_key(v).hex() for v in values))
        """
    )
    import pickle

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps(SAMPLES),
        capture_output=True,
        check=True,
        env=env,
        timeout=30,
    )
    theirs = done.stdout.decode().split()
    assert theirs == [task_key(value).hex() for value in SAMPLES]  # type: ignore[union-attr]


def test_numbers_of_equal_value_and_other_types_differ() -> None:
    assert len({task_key(v) for v in [1, 1.0, True, 1 + 0j, np.int64(1), np.float64(1.0)]}) == 6
    assert task_key(0.0) != task_key(-0.0)  # equal by ==, yet atan2/copysign tell them apart
    assert task_key(float("nan")) == task_key(-float("nan")) == task_key(math.nan)


def test_dicts_and_sets_ignore_insertion_order() -> None:
    assert task_key({"a": 1, "b": 2}) == task_key({"b": 2, "a": 1})
    assert task_key({3, 1, 2}) == task_key({2, 3, 1})
    assert task_key({"a": 1}) != task_key({"a": 2})
    assert task_key({1: "a"}) != task_key({True: "a"})
    assert task_key({1}) != task_key(frozenset({1}))


def test_numpy_arrays_key_on_dtype_shape_and_bytes() -> None:
    arrays = [np.zeros((2, 3)), np.zeros((3, 2)), np.zeros(6), np.zeros(6, dtype=int)]
    assert len({task_key(a) for a in arrays}) == 4
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    # A view keys as its contiguous copy (same content, same dtype and shape).
    assert task_key(base.T) == task_key(np.ascontiguousarray(base.T))
    assert task_key(base[:, ::2]) == task_key(base[:, ::2].copy())
    assert task_key(base) != task_key(base.astype(np.int64))
    assert task_key(np.array([1.0, 2.0])) != task_key(np.array([1.0, 2.5]))
    assert task_key(np.float32(1.0)) != task_key(np.float64(1.0))
    structured = np.zeros(2, dtype=[("x", "<i4"), ("y", "<f8")])
    assert task_key(structured) is not None
    assert task_key(np.array(["2020-01-01"], dtype="datetime64[D]")) is not None
    assert task_key(np.array([object()], dtype=object)) is None  # its bytes are pointers


def test_numpy_is_never_imported_by_keys() -> None:
    script = "import sys; from multitrack._keys import task_key; task_key((1, 'a', object()));"
    script += "print('numpy' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.strip() == "False"


class Color(enum.Enum):
    RED = 1
    GREEN = 2


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass(frozen=True)
class Job:
    path: str
    size: int = 3


def test_common_records_are_keyed_by_class_and_content() -> None:
    assert task_key(Color.RED) != task_key(Color.GREEN)
    assert task_key(Color.RED) != task_key(1)
    assert task_key(Point(1, 2)) == task_key(Point(1, 2))
    assert task_key(Point(1, 2)) != task_key((1, 2))
    assert task_key(Job("a")) == task_key(Job("a", 3))
    assert task_key(Job("a")) != task_key(Job("a", 4))
    assert task_key(pathlib.PurePosixPath("a")) != task_key(pathlib.PureWindowsPath("a"))
    assert task_key(pathlib.Path("a")) != task_key("a")


class Opaque:
    pass


@dataclasses.dataclass
class WithExtra:
    x: int

    def __post_init__(self) -> None:
        self.cache = object()  # state that is not a field


def test_what_cannot_be_encoded_exactly_gives_none() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: Any = 0
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    unsupported = [
        object(),
        Opaque(),
        lambda x: x,
        cyclic,
        deep,
        {"a": object()},
        (1, [2, {3: Opaque()}]),
        WithExtra(1),
        collections.OrderedDict(a=1),
        range(3),
    ]
    assert [task_key(value) for value in unsupported] == [None] * len(unsupported)
    shallow: Any = 0
    for _ in range(MAX_DEPTH - 1):
        shallow = [shallow]
    assert task_key(shallow) is not None


def test_index_keys_never_equal_content_keys() -> None:
    assert index_key(5) == index_key(5) != index_key(6)
    assert index_key(5) not in {task_key(v) for v in [5, "5", b"5", "#index:5", b"#index:5"]}


# -- hypothesis: different values never share a key -----------------------------------------


def _canonical(value: Any) -> Any:
    """What the key must distinguish: type and value, floats by bits (all NaNs one), dicts
    and sets without their order."""
    kind = type(value).__name__
    if isinstance(value, float):
        return (kind, "nan" if value != value else struct.pack("<d", value))
    if isinstance(value, (tuple, list)):
        return (kind, tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return (kind, frozenset((_canonical(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (kind, frozenset(_canonical(v) for v in value))
    return (kind, value)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.binary(max_size=6)
)
_hashables = st.recursive(
    _scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6
)
_values = st.recursive(
    _scalars | _hashables,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner)
        | st.tuples(inner, inner)
        | st.dictionaries(_hashables, inner, max_size=3)
        | st.sets(_hashables, max_size=3)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(_values, min_size=2, max_size=10))
def test_keys_differ_exactly_when_values_differ(values: list[Any]) -> None:
    canon_by_key: dict[bytes | None, Any] = {}
    key_by_canon: dict[Any, bytes | None] = {}
    for value in values:
        key, canon = task_key(value), _canonical(value)
        assert key is not None
        assert canon_by_key.setdefault(key, canon) == canon, f"collision: {value!r}"
        assert key_by_canon.setdefault(canon, key) == key, f"unstable: {value!r}"
    for value in values:  # the same value copied keys the same
        assert task_key(_copy(value)) == task_key(value)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in reversed(list(value.items()))}
    return value


# -- occurrence numbers ---------------------------------------------------------------------


def test_occurrences_count_earlier_equal_keys() -> None:
    keys = [task_key(v) for v in ["a", "b", "a", "c", "a", "b"]]
    seen = Occurrences()
    assert [seen.next(k) for k in keys] == [0, 0, 1, 0, 2, 1]  # type: ignore[arg-type]


def test_a_saturated_filter_numbers_deterministically() -> None:
    keys = [task_key(i % 50) for i in range(200)]
    first, second = Occurrences(bits=64), Occurrences(bits=64)  # false "maybe seen" galore
    numbers = [first.next(k) for k in keys]  # type: ignore[arg-type]
    assert numbers == [second.next(k) for k in keys]  # type: ignore[arg-type]
    pairs = list(zip(keys, numbers, strict=True))
    assert len(set(pairs)) == len(pairs)  # still one (key, occurrence) per task
    with pytest.raises(ValueError, match="power of two"):
        Occurrences(bits=1000)


# -- the function's identity ----------------------------------------------------------------

ORIGINAL = '''
import math

def resize_one(path, size=3):
    """Resize one image."""
    # scale it
    def inner(x):
        """Inner doc."""
        return x * 2
    return math.floor(inner(len(path)) * size)
'''

SAME = [
    # docstring edited
    ORIGINAL.replace("Resize one image.", "Resize one image, nicely."),
    # comment edited and moved down by a few lines (in another file)
    "\n\n\n\n" + ORIGINAL.replace("# scale it", "# scale it (see issue 12)"),
    # the inner function's docstring edited
    ORIGINAL.replace("Inner doc.", "Doubles."),
    # a docstring removed
    ORIGINAL.replace('    """Resize one image."""\n', ""),
]

CHANGED = [
    ORIGINAL.replace("x * 2", "x * 3"),
    ORIGINAL.replace("x * 2", "x + 2"),
    ORIGINAL.replace("math.floor", "math.ceil"),
    ORIGINAL.replace("size=3", "size=4"),
    ORIGINAL.replace("def resize_one(path, size=3)", "def resize_one(path, *, size=3)"),
    ORIGINAL.replace("len(path)", "len(path) + 0"),
]


def _compile(source: str, filename: str = "first.py") -> types.FunctionType:
    namespace: dict[str, Any] = {"__name__": "jobs"}
    exec(compile(source, filename, "exec"), namespace)
    fn = namespace["resize_one"]
    assert isinstance(fn, types.FunctionType)
    return fn


def test_identity_ignores_docstrings_comments_and_moves() -> None:
    name, digest = function_identity(_compile(ORIGINAL))
    assert name == "jobs:resize_one"
    for number, source in enumerate(SAME):
        assert function_identity(_compile(source, f"moved{number}.py")) == (name, digest), source


def test_identity_changes_with_the_body() -> None:
    digest = function_identity(_compile(ORIGINAL))[1]
    digests = {function_identity(_compile(source))[1] for source in CHANGED}
    assert digest not in digests
    assert len(digests) == len(CHANGED)


def test_identity_unwraps_partial_spread_and_instances() -> None:
    fn = _compile(ORIGINAL)
    name, digest = function_identity(fn)
    assert function_identity(Spread(fn)) == (name, digest)
    bound = function_identity(functools.partial(fn, size=5))
    assert bound[0] == name and bound[1] != digest
    assert function_identity(functools.partial(fn, size=5)) == bound
    assert function_identity(functools.partial(fn, size=6))[1] != bound[1]

    class Resizer:
        def __call__(self, path: str) -> int:
            return len(path)

    assert function_identity(Resizer())[0].endswith(
        ":test_identity_unwraps_partial_spread_and_instances.<locals>.Resizer"
    )
    assert function_identity(Resizer()) == function_identity(Resizer())
    assert function_identity(len) == function_identity(len)
    assert function_identity(len)[0] == "builtins:len"
    assert function_identity(len)[1] != function_identity(abs)[1]
    assert function_identity(os.path.join)[0] == "posixpath:join"
    assert function_identity(str)[0] == "builtins:str"


def test_identity_counts_closure_values() -> None:
    def make(factor: int) -> Any:
        def scaled(x: int) -> int:
            return x * factor

        return scaled

    assert function_identity(make(2)) == function_identity(make(2))
    assert function_identity(make(2))[1] != function_identity(make(3))[1]


def test_identity_is_equal_in_another_process(tmp_path: pathlib.Path) -> None:
    module = tmp_path / "jobs_mod.py"
    module.write_text(ORIGINAL)
    script = "import jobs_mod; from multitrack._keys import function_identity as f;"
    script += "n, d = f(jobs_mod.resize_one); print(n, d.hex())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONHASHSEED": "7"}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**env, "PYTHONHASHSEED": seed},
            timeout=30,
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]
    assert runs[0].split()[0] == "jobs_mod:resize_one"
