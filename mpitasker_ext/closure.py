"""Turn a notebook cell into a job: a function of the loop target, plus the notebook names it captures.

The cell body becomes the body of ``def job(<target>)``; its last expression is the result. Free names are
looked up in the user namespace once, in the kernel, and each is pickled separately (cloudpickle), so an
unpicklable or undefined name is reported by name before anything is launched. The source travels as text
and is compiled again on each engine under a pseudo file name registered in ``linecache``, so tracebacks
point at the cell's own lines.
"""

import ast
import builtins
import hashlib
import importlib
import linecache
import pickle
import re
import symtable
import types
from dataclasses import dataclass, field

from .errors import ClosureError, UsageError
from .identity import code_fingerprint

CELL_FILENAME = "<mpimap cell>"
_ARG = "__mpimap_arg__"
_FUNC = "cell"
_FOR = re.compile(r"(?:^|\s)for\s")


@dataclass
class Loop:
    """``for TARGET in ITERABLE`` from the magic line."""

    target: str
    iterable: str
    names: tuple


@dataclass
class CellJob:
    """What the engines need to rebuild the job function: the cell's text and the pickled captured values."""

    target: str
    body: str
    captured: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    fingerprint: str = ""

    def function(self):
        """Compile the job where it will run; captured values are unpickled here, once."""
        module, _ = job_module(self.target, self.body)
        lines = self.body.splitlines(keepends=True)
        linecache.cache[CELL_FILENAME] = (len(self.body), None, lines, CELL_FILENAME)
        namespace = {"__builtins__": builtins, "__name__": "__mpimap__"}
        for name, module_name in self.modules.items():
            namespace[name] = importlib.import_module(module_name)
        for name, data in self.captured.items():
            namespace[name] = pickle.loads(data)
        exec(compile(module, CELL_FILENAME, "exec"), namespace)
        return namespace[_FUNC]


def split_loop(line):
    """Split a magic line into (options and output, loop text) at the first standalone ``for``."""
    match = _FOR.search(line)
    if match is None:
        raise UsageError("the magic line needs a loop: %%mpimap [options] OUTPUT for TARGET in ITERABLE "
                         "(e.g. %%mpimap results.pkl for x in range(10))")
    start = match.start() + (1 if line[match.start()].isspace() else 0)
    return line[:start].strip(), line[start:].strip()


def parse_loop(text):
    """Check ``for TARGET in ITERABLE`` and return its parts; plain names and tuples of names only."""
    try:
        tree = ast.parse(text.rstrip().rstrip(":") + ":\n    pass\n")
    except SyntaxError as exc:
        raise UsageError(f"cannot read the loop {text!r}: {exc.msg}. Write it as in Python: "
                         "for x in values  /  for a, b in pairs") from None
    node = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(node, ast.For) or node.orelse:
        raise UsageError(f"{text!r} is not a single 'for TARGET in ITERABLE' loop")
    names = _target_names(node.target)
    if names is None:
        raise UsageError(f"the loop target {ast.unparse(node.target)!r} must be a name or a tuple of names "
                         "(for x in ..., for a, (b, c) in ...)")
    if len(set(names)) != len(names):
        raise UsageError(f"the loop target {ast.unparse(node.target)!r} repeats a name")
    return Loop(ast.unparse(node.target), ast.unparse(node.iter), tuple(names))


def _target_names(target):
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        names = []
        for element in target.elts:
            sub = _target_names(element)
            if sub is None:
                return None
            names += sub
        return names
    return None


def job_module(target, body):
    """The job function as an AST whose line numbers are the cell's own: the target is unpacked from the one
    argument, the last expression is returned. Also returns a layout-free dump of the body for fingerprints."""
    try:
        tree = ast.parse(body, CELL_FILENAME)
    except SyntaxError as exc:
        raise UsageError(f"the cell body has a syntax error on line {exc.lineno}: {exc.msg}") from None
    if not tree.body:
        raise UsageError("the cell body is empty: write the job, with the result as its last expression")
    last = tree.body[-1]
    if isinstance(last, ast.Expr):
        tree.body[-1] = ast.copy_location(ast.Return(last.value), last)
    module = ast.parse(f"def {_FUNC}({_ARG}):\n    {target} = {_ARG}\n")
    for node in ast.walk(module):
        if hasattr(node, "lineno"):
            node.lineno = node.end_lineno = 1
    module.body[0].body.extend(tree.body)
    return ast.fix_missing_locations(module), ast.dump(tree)


def free_names(module):
    """Names the job reads from outside: globals of the job function in the compiled symbol table."""
    table = symtable.symtable(ast.unparse(module), CELL_FILENAME, "exec")
    job_table = next(t for t in table.get_children() if t.get_name() == _FUNC)
    names = set(job_table.get_globals())
    for child in _walk_tables(job_table):
        names.update(child.get_globals() if hasattr(child, "get_globals") else ())
    return sorted(names)


def _attributes_read(module, name):
    """The attributes the job reads from the module bound to ``name`` (``helpers.f`` gives ``f``): what it runs
    from a module counts in the fingerprint, not only the module's name."""
    return sorted({node.attr for node in ast.walk(module) if isinstance(node, ast.Attribute)
                   and isinstance(node.value, ast.Name) and node.value.id == name})


def _walk_tables(table):
    for child in table.get_children():
        yield child
        yield from _walk_tables(child)


def build_job(loop, body, user_ns):
    """Everything the engines need for this cell; every name problem is raised here, by name."""
    import cloudpickle

    module, body_dump = job_module(loop.target, body)
    captured, modules, identities = {}, {}, []
    for name in free_names(module):
        if name in user_ns:
            value = user_ns[name]
        elif hasattr(builtins, name):
            continue
        else:
            raise ClosureError(f"name {name!r} is not defined in the notebook: the cell uses it, so define it "
                               "in an earlier cell (or in the cell itself) and run again")
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
            identities.append(f"{name}=module:{value.__name__}:{code_fingerprint(value)}")
            identities += [f"{name}.{attr}={code_fingerprint(getattr(value, attr))}"
                           for attr in _attributes_read(module, name) if hasattr(value, attr)]
            continue
        try:
            captured[name] = cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - pickling user objects can raise any type
            raise ClosureError(f"variable {name!r} ({type(value).__name__}) cannot be sent to the engines: "
                               f"{type(exc).__name__}: {exc}. Create it inside the cell, or pass what it is "
                               "built from instead") from None
        identities.append(f"{name}={code_fingerprint(value)}")
    fingerprint = hashlib.blake2b(
        (body_dump + "\n" + loop.target + "\n" + "\n".join(identities)).encode(), digest_size=16).hexdigest()
    return CellJob(loop.target, body, captured, modules, fingerprint)
