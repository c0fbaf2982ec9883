"""The argument digest and the code fingerprint: never a stale result, never a false CodeChanged."""

import collections
import copy
import dataclasses
import functools
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid

import numpy as np
import pytest

from conftest import REPO
from mpitasker_ext import CodeChanged, closure, fingerprint, identity
from mpitasker_ext.errors import UsageError
from mpitasker_ext.identity import args_digests

SEEDS = ("1", "2", "3")


def in_fresh_processes(code, seeds=SEEDS):
    """The last stdout line of `code` run in one new interpreter per hash seed."""
    outputs = []
    for seed in seeds:
        proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r})\n" + code],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED=seed), timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.strip().splitlines()[-1])
    return outputs


# ---- the argument digest ------------------------------------------------------------------------------------


def test_args_digest_is_the_same_under_every_hash_seed():
    code = textwrap.dedent("""
        import collections, dataclasses
        from mpitasker_ext.identity import args_digest
        Pair = collections.namedtuple("Pair", "name tags")
        @dataclasses.dataclass
        class Spec:
            tags: set
        words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}
        arg = (Pair("p", words), Spec(set(words)), {frozenset(words): 1}, dict.fromkeys(words, 3), words,
               [dict.fromkeys(sorted(words)[:3]), {frozenset({"x", "y"}), frozenset({"z"})}])
        print(args_digest(arg).hex())
    """)
    assert len(set(in_fresh_processes(code))) == 1


def test_dict_from_a_set_is_one_argument_on_every_rank():
    code = textwrap.dedent("""
        from mpitasker_ext.identity import args_digest
        words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}
        print(args_digest(dict.fromkeys(words, 7)).hex())
    """)
    expected = identity.args_digest(dict.fromkeys(sorted(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta",
                                                        "theta"]), 7)).hex()
    assert in_fresh_processes(code) == [expected] * len(SEEDS)


def test_dict_insertion_order_does_not_matter_but_ordered_dict_order_does():
    assert identity.args_digest({"a": 1, "b": [2, {"c": 3, "d": 4}]}) == identity.args_digest(
        {"b": [2, {"d": 4, "c": 3}], "a": 1})
    assert identity.args_digest(collections.OrderedDict(a=1, b=2)) != identity.args_digest(
        collections.OrderedDict(b=2, a=1))


Pair = collections.namedtuple("Pair", "name tags")


@dataclasses.dataclass
class Spec:
    tags: set
    weights: dict


def test_sets_inside_namedtuples_dataclasses_and_dict_keys_are_canonical():
    one, other = {1, 9}, {9, 1}
    assert list(one) != list(other)  # equal sets, iterated in another order
    assert identity.args_digest(Pair("p", one)) == identity.args_digest(Pair("p", other))
    assert identity.args_digest(Spec(one, {"a": 1, "b": 2})) == identity.args_digest(Spec(other, {"b": 2, "a": 1}))
    assert identity.args_digest({frozenset(one): "k"}) == identity.args_digest({frozenset(other): "k"})
    assert identity.args_digest(Pair("p", one)) != identity.args_digest(Pair("p", {1, 8}))


class Plain:
    """Default repr: it holds the memory address."""

    def __init__(self, value):
        self.value = value


def test_set_of_default_repr_objects_does_not_depend_on_addresses():
    keep = []
    for _ in range(20):
        first = (Plain(0), Plain(1))
        later = tuple(reversed([Plain(1), Plain(0)]))
        keep += [first, later]
        if (id(first[0]) < id(first[1])) != (id(later[0]) < id(later[1])):
            break
    else:
        pytest.skip("could not allocate two pairs in opposite address order")
    assert identity.args_digest(set(first)) == identity.args_digest(set(later))
    assert identity.args_digest({Plain(0), Plain(1)}) != identity.args_digest({Plain(0), Plain(2)})


def test_a_numpy_view_has_the_digest_of_its_copy():
    grid = np.arange(60.0).reshape(6, 10)
    for j in range(10):
        assert identity.args_digest(grid[:, j]) == identity.args_digest(grid[:, j].copy())
    assert identity.args_digest((grid[::2, 1:], 5)) == identity.args_digest((np.array(grid[::2, 1:]), 5))
    assert identity.args_digest(np.asfortranarray(grid)) == identity.args_digest(grid)
    big = np.random.default_rng(0).random((400, 3000))  # several copy chunks
    assert identity.args_digest(big[:, ::3]) == identity.args_digest(big[:, ::3].copy())
    assert identity.args_digest(big.T) == identity.args_digest(big.T.copy())
    assert identity.args_digest(grid) != identity.args_digest(grid.T)
    assert identity.args_digest(grid) != identity.args_digest(grid.reshape(10, 6))
    assert identity.args_digest(grid) != identity.args_digest(grid.astype(np.float32))


def test_shared_parts_and_cycles():
    part, grid = [1, 2], np.arange(4.0)
    assert identity.args_digest([part, part]) == identity.args_digest([part, copy.copy(part)])
    assert identity.args_digest([grid, grid]) == identity.args_digest([grid, grid.copy()])  # pickle's memo differs
    loop, other = [], []
    loop.append(loop)
    other.append(other)
    assert identity.args_digest(loop) == identity.args_digest(other)
    assert identity.args_digest(loop) != identity.args_digest([[]])


def test_values_a_job_can_tell_apart_have_different_digests():
    values = [1, 1.0, True, "1", b"1", bytearray(b"1"), 1 + 0j, np.int64(1), np.float64(1.0), 0.0, -0.0, 0,
              False, None, (1,), [1], {1}, frozenset({1}), {1: None}, collections.OrderedDict({1: None}),
              range(1), Plain, Pair, 2 ** 70, float("inf"), "", b"", (), []]
    digests = [identity.args_digest(v) for v in values]
    assert len(set(digests)) == len(values)
    assert identity.args_digest(float("nan")) == identity.args_digest(float("nan"))


def test_fast_paths_give_the_general_encoding():
    from mpitasker_ext.fingerprint import ArgumentEncoder
    for value in [0, -5, 2 ** 63, -(2 ** 80), "", "héllo\ud800", 1.5, -0.0, (1, "a", 2.5, None, True), ("x",), (),
                  [1, 2, 3], {"a": 1, "b": 2.0}, {3, 4}]:
        encoder = ArgumentEncoder()
        encoder.encode(value)
        assert identity.args_digest(value) == encoder.digest(), value


def _defined_in_main(source, **names):
    """What `source` defines, as if typed in a notebook cell (module __main__: the user's code)."""
    namespace = {"__name__": "__main__", **names}
    exec(textwrap.dedent(source), namespace)  # noqa: S102 - test code standing for a notebook cell
    return namespace


def test_functions_in_arguments_count_by_their_code_closure_and_defaults():
    make = _defined_in_main("""
        def make(k):
            def f(x):
                return x + k
            return f
    """)["make"]
    assert identity.args_digest(make(1)) != identity.args_digest(make(100))
    assert identity.args_digest(make(1)) == identity.args_digest(make(1))
    assert identity.args_digest([make(1), make(2)]) != identity.args_digest([make(10), make(20)])
    one, two = _defined_in_main("f = lambda: 1")["f"], _defined_in_main("f = lambda: 2")["f"]
    assert identity.args_digest(one) != identity.args_digest(two)
    assert identity.args_digest(os.path.join) == identity.args_digest(os.path.join)  # a library's: by reference


MODEL = """
    class Model:
        def __init__(self, k):
            self.k = k
        def run(self):
            return self.k * 2
"""


def test_editing_the_class_of_an_argument_changes_its_digest():
    first, edited, again = (_defined_in_main(MODEL.replace("2", factor))["Model"] for factor in "232")
    assert identity.args_digest(first(1)) != identity.args_digest(edited(1))
    assert identity.args_digest(first(1)) == identity.args_digest(again(1))
    assert args_digests([first(1), first(2)]) != args_digests([edited(1), edited(2)])
    assert identity.args_digest(first(1)) != identity.args_digest(first(2))


def test_args_digests_hashes_a_class_once_per_call_and_agrees_with_args_digest(monkeypatch):
    space = _defined_in_main(textwrap.dedent(MODEL) + textwrap.dedent("""
        def build(k):
            return Model(k)
        Model.default = Model(0)
    """))
    model = space["Model"]
    tree = {"shared": [1, 2, 3]}
    loop = [tree]
    loop.append(loop)
    args = [model(1), model(2), model, model.run, model(3).run, space["build"], (tree, tree), loop, [loop, tree],
            model.default, 7, "x"]
    assert args_digests(args) == [identity.args_digest(arg) for arg in args]  # rank 0 and the workers agree

    counted = []
    real = fingerprint.code_digest
    monkeypatch.setattr(fingerprint, "code_digest", lambda obj, shared: counted.append(obj) or real(obj, shared))
    many = [model(i) for i in range(1000)]
    before = args_digests(many)
    assert counted.count(model) == 1
    monkeypatch.setattr(model, "run", lambda self: self.k * 3)  # edited between two calls: hashed again
    assert args_digests(many)[0] != before[0]


def test_a_user_module_counts_by_its_source_and_the_attributes_code_reads(tmp_path, monkeypatch, caplog):
    name = f"idhelpers_{uuid.uuid4().hex}"
    source = tmp_path / f"{name}.py"
    source.write_text("def f(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = __import__(name)
    monkeypatch.setitem(sys.modules, name, helpers)
    uses = _defined_in_main("def g(x):\n    return helpers.f(x)\n", helpers=helpers)["g"]
    fp = identity.code_fingerprint
    first, module_first, as_argument = fp(uses), fp(helpers), identity.args_digest(helpers)

    source.write_text("def f(x):\n    return x * 5\n")  # edited next to the notebook, not reloaded
    assert fp(uses) != first
    assert fp(helpers) != module_first
    assert identity.args_digest(helpers) != as_argument
    source.write_text("def f(x):\n    return x * 2\n")
    assert (fp(uses), fp(helpers)) == (first, module_first)

    monkeypatch.setattr(helpers, "f", lambda x: x * 7)  # patched in memory: the file is unchanged
    assert fp(uses) != first
    monkeypatch.undo()
    assert fp(uses) == first

    source.unlink()
    with caplog.at_level(logging.DEBUG, logger="mpitasker_ext.fingerprint"):
        assert fp(uses) != first  # only the name is left to count
    assert name in caplog.text
    assert fp(os) == fp(os)  # a library module: by name


def _grid(n):
    nodes = [[Plain((r, c)) for c in range(n)] for r in range(n)]
    for r in range(n):
        for c in range(n):
            nodes[r][c].neighbours = [nodes[r + dr][c + dc] for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))
                                      if 0 <= r + dr < n and 0 <= c + dc < n]
    return nodes


def _doubled(levels, share=True):
    x = [1]
    for _ in range(levels):
        x = [x, x if share else copy.deepcopy(x)]
    return x


def test_shared_parts_and_interlinked_objects_take_linear_time():
    import time
    started = time.perf_counter()
    identity.args_digest(_doubled(20))  # 2 ** 20 paths, 21 lists
    identity.args_digest(_grid(5)[0][0])  # every node reaches every other by many paths
    assert time.perf_counter() - started < 0.5

    assert identity.args_digest(_doubled(6)) == identity.args_digest(_doubled(6, share=False))  # sharing is not data
    assert identity.args_digest(_doubled(6)) != identity.args_digest(_doubled(7))
    one, other = _grid(4), _grid(4)
    assert identity.args_digest(one[0][0]) == identity.args_digest(other[0][0])
    assert identity.args_digest(one) == identity.args_digest(other)
    other[3][3].value = (9, 9)
    assert identity.args_digest(one[0][0]) != identity.args_digest(other[0][0])


def test_an_interlinked_argument_is_the_same_under_every_hash_seed():
    code = textwrap.dedent("""
        from mpitasker_ext.identity import args_digest
        class Node:
            def __init__(self, name):
                self.name, self.links, self.tags = name, [], {name, name * 2}
        nodes = [Node(c) for c in "abcdefgh"]
        for i, node in enumerate(nodes):
            node.links += [nodes[(i + 1) % 8], nodes[(i * 3) % 8]]
        def make(k):
            return lambda x: x + k
        print(args_digest((nodes, {n.name: n for n in nodes}, make(3), {frozenset(n.tags) for n in nodes})).hex())
    """)
    assert len(set(in_fresh_processes(code))) == 1


def test_dict_keys_of_one_form_do_not_depend_on_insertion_order():
    nan, other_nan = float("nan"), float("nan")
    assert identity.args_digest({nan: 1, other_nan: [2]}) == identity.args_digest({other_nan: [2], nan: 1})
    assert identity.args_digest({nan: 1, other_nan: [2]}) != identity.args_digest({nan: 1, other_nan: [3]})


def test_an_argument_deeper_than_the_recursion_limit_is_a_usage_error():
    deep = None
    for i in range(sys.getrecursionlimit() * 2):
        deep = Spec({i}, {"next": deep})
    with pytest.raises(UsageError, match="nests too deeply"):
        identity.args_digest(deep)


@pytest.mark.parametrize("make, name", [
    (lambda: (i for i in range(3)), "generator"),
    (threading.Lock, "lock"),
    (lambda: open(os.devnull), "TextIOWrapper"),
])
def test_unsupported_arguments_are_a_usage_error_naming_the_type(make, name):
    value = make()
    try:
        with pytest.raises(UsageError, match=rf"{name}.*pass plain data"):
            identity.args_digest([1, {"inner": value}])
    finally:
        if hasattr(value, "close"):
            value.close()


# ---- the code fingerprint: scripts ---------------------------------------------------------------------------


class _Config:
    factor = 2


def _scaled(x):
    return x * _Config.factor


class _Scale:
    def __init__(self, k):
        self.k = k

    def __call__(self, v):
        return v * self.k

    def apply(self, v):
        return v * self.k


def _times(v, k=2):
    return v * k


def _times_kw(v, *, k=2):
    return v * k


def _plus(v, k=2):
    return v + k


def test_script_fingerprint_covers_class_attributes_state_partials_defaults_and_wrappers(monkeypatch):
    before = identity.code_fingerprint(_scaled)
    monkeypatch.setattr(_Config, "factor", 3)
    assert identity.code_fingerprint(_scaled) != before
    monkeypatch.undo()
    assert identity.code_fingerprint(_scaled) == before

    fp = identity.code_fingerprint
    assert fp(functools.partial(_times, k=2)) != fp(functools.partial(_times, k=3))
    assert fp(functools.partial(_times, k=2)) != fp(functools.partial(_plus, k=2))
    assert fp(_Scale(2)) != fp(_Scale(3))
    assert fp(_Scale(2).apply) != fp(_Scale(3).apply)
    assert fp(_Scale(2)) == fp(_Scale(2))
    assert fp(functools.lru_cache(_times)) != fp(functools.lru_cache(_plus))

    def defaults_changed(fn, **kw):
        saved = fn.__defaults__, fn.__kwdefaults__
        original = fp(fn)
        fn.__defaults__, fn.__kwdefaults__ = kw.get("defaults", saved[0]), kw.get("kwdefaults", saved[1])
        try:
            return fp(fn) != original
        finally:
            fn.__defaults__, fn.__kwdefaults__ = saved
    assert defaults_changed(_times, defaults=(3,))
    assert defaults_changed(_times_kw, kwdefaults={"k": 3})


def test_pickling_an_instance_does_not_change_its_class_fingerprint():
    class Fresh:
        k = 2
    before = identity.code_fingerprint(Fresh)
    Fresh().__reduce_ex__(4)  # what pickling does: copyreg caches __slotnames__ on the class
    assert "__slotnames__" in vars(Fresh)
    assert identity.code_fingerprint(Fresh) == before


def test_an_unencodable_capture_counts_by_its_type(caplog):
    def make(lock):
        return lambda v: (lock, v)
    with caplog.at_level(logging.DEBUG, logger="mpitasker_ext.fingerprint"):
        assert identity.code_fingerprint(make(threading.Lock())) == identity.code_fingerprint(make(threading.Lock()))
    assert "_thread.lock" in caplog.text


# ---- the code fingerprint: %%mpimap cells --------------------------------------------------------------------


def cell_fingerprint(shell, setup, body, loop="for x in range(3)"):
    result = shell.run_cell(textwrap.dedent(setup))
    assert result.success, result.error_in_exec or result.error_before_exec
    return closure.build_job(closure.parse_loop(loop), body, shell.user_ns).fingerprint


EDITS = {
    "class attribute": ("""
        class C:
            scale = 2
        """, "x * C.scale"),
    "class attribute through an instance": ("""
        class C:
            scale = 2
            def apply(self, v):
                return v * self.scale
        c = C()
        """, "c.apply(x)"),
    "method body through an instance": ("""
        class C:
            def apply(self, v):
                return v * 2
        c = C()
        """, "c.apply(x)"),
    "staticmethod body": ("""
        class C:
            @staticmethod
            def apply(v):
                return v * 2
        """, "C.apply(x)"),
    "classmethod body": ("""
        class C:
            @classmethod
            def apply(cls, v):
                return v * 2
        """, "C.apply(x)"),
    "property body": ("""
        class C:
            @property
            def k(self):
                return 2
        c = C()
        """, "c.k * x"),
    "nested class": ("""
        class Outer:
            class Inner:
                k = 2
        """, "Outer.Inner.k * x"),
    "base class method": ("""
        class Base:
            def apply(self, v):
                return v * 2
        class C(Base):
            pass
        """, "C().apply(x)"),
    "default of a called function": ("""
        def g(v, k=2):
            return v * k
        def f(v):
            return g(v)
        """, "f(x)"),
    "keyword-only default": ("""
        def f(v, *, k=2):
            return v * k
        """, "f(x)"),
    "function inside a partial": ("""
        import functools
        def f(v, k):
            return v * k * 2
        p = functools.partial(f, k=1)
        """, "p(x)"),
    "callable object": ("""
        class M:
            def __call__(self, v):
                return v * 2
        m = M()
        """, "m(x)"),
    "bound method": ("""
        class M:
            def apply(self, v):
                return v * 2
        apply = M().apply
        """, "apply(x)"),
    "lru_cache body": ("""
        import functools
        @functools.lru_cache
        def f(v):
            return v * 2
        """, "f(x)"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_each_edit_the_job_can_reach_changes_the_cell_fingerprint(shell, edit):
    setup, body = EDITS[edit]
    changed = setup.replace("2", "3")
    first = cell_fingerprint(shell, setup, body)
    edited = cell_fingerprint(shell, changed, body)
    again = cell_fingerprint(shell, setup, body)
    assert first != edited, f"editing the {edit} left the fingerprint unchanged"
    assert first == again, f"redefining the same {edit} changed the fingerprint"


def test_library_internals_do_not_change_the_cell_fingerprint(shell):
    setup = """
        from re import sub
        def clean(s):
            return sub("a+", "a", s)
    """
    first = cell_fingerprint(shell, setup, "clean(str(x)) + sub('b+', 'b', 'bb')")
    re.compile("x+y" + uuid.uuid4().hex)  # fills re's private cache, which the function reaches
    assert cell_fingerprint(shell, setup, "clean(str(x)) + sub('b+', 'b', 'bb')") == first


def test_a_captured_set_has_one_fingerprint_after_every_restart():
    code = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        from mpitasker_ext import closure
        shell = InteractiveShell.instance()
        shell.run_cell("names = {'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'}\\n"
                       "def pick(i):\\n    return sorted(names)[i]\\n")
        print(closure.build_job(closure.parse_loop("for x in range(3)"), "pick(x) + str(len(names))",
                                shell.user_ns).fingerprint)
    """)
    assert len(set(in_fresh_processes(code, seeds=("1", "2")))) == 1


def test_rerun_after_a_class_attribute_edit_raises_code_changed(shell, tmp_path, capsys):
    from mpitasker_ext.magics import MPIMapMagics
    magics = MPIMapMagics(shell)  # a fresh instance: no cluster, so the cell runs serially in the kernel
    shell.run_cell(textwrap.dedent(EDITS["class attribute through an instance"][0]))
    line = "-o r scaled.pkl for x in range(3)"
    magics.mpimap(line, "c.apply(x)")
    assert shell.user_ns["r"] == [0, 2, 4]
    magics.mpimap(line, "c.apply(x)")
    assert shell.user_ns["r"] == [0, 2, 4]
    shell.run_cell(textwrap.dedent(EDITS["class attribute through an instance"][0]).replace("2", "3"))
    with pytest.raises(CodeChanged):
        magics.mpimap(line, "c.apply(x)")


def test_a_cell_calling_into_a_user_module_follows_its_source(shell, tmp_path, monkeypatch):
    """`import helpers` then `helpers.f(x)` in the cell: editing helpers.py (or rebinding helpers.f) is a change."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helpers_nb.py").write_text("def f(x):\n    return x * 2\n")
    before = cell_fingerprint(shell, "import helpers_nb", "helpers_nb.f(x)")
    (tmp_path / "helpers_nb.py").write_text("def f(x):\n    return x * 7\n")
    assert cell_fingerprint(shell, "", "helpers_nb.f(x)") != before
    edited = cell_fingerprint(shell, "", "helpers_nb.f(x)")
    assert cell_fingerprint(shell, "helpers_nb.f = lambda x: -x", "helpers_nb.f(x)") != edited
    assert cell_fingerprint(shell, "import numpy as np", "np.sqrt(x)") == cell_fingerprint(shell, "", "np.sqrt(x)")
