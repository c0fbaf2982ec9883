"""The two identities the cache rests on: the argument digest and the code fingerprint.

Both are blake2b over one canonical, type-tagged, length-prefixed encoding of a value, so they are the same in
every process and every kernel: nothing depends on the hash seed, on memory addresses or on pickle's memo.
Both hash the user's own code by value (what the job will run; in an argument, a closure or the class of an
instance) and installed libraries by reference; a user module by its source. Shared parts are hashed once per
call. See docs/design.md, "Identities", for the rules and why each decision was taken.
"""

import copyreg
import functools
import hashlib
import logging
import os
import site
import struct
import sys
import sysconfig
import types
from collections import OrderedDict

from .errors import UsageError

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
_INT64 = struct.Struct("<q")
_FLOAT = struct.Struct("<d")
_COMPLEX = struct.Struct("<dd")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ARRAY_CHUNK = 1 << 20  # bytes of a non-contiguous array copied at a time

# Entries of a class's namespace that are layout, documentation or runtime caches, not behaviour
# (copyreg adds __slotnames__ the first time an instance is pickled).
_SKIPPED_CLASS_ATTRS = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__",
                                  "__annotations__", "__firstlineno__", "__static_attributes__", "_abc_impl",
                                  "__slotnames__"})
_SLOT_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType)


def _int_bytes(value):
    if _INT64_MIN <= value <= _INT64_MAX:
        return b"i" + _INT64.pack(value)
    size = (value.bit_length() + 8) // 8
    return b"I" + _LENGTH.pack(size) + value.to_bytes(size, "little", signed=True)


def _str_bytes(value):
    data = value.encode("utf-8", "surrogatepass")
    return b"s" + _LENGTH.pack(len(data)) + data


_SCALARS = {
    int: _int_bytes,
    str: _str_bytes,
    float: lambda value: b"f" + _FLOAT.pack(value),  # IEEE bits: -0.0 and 0.0 differ, NaN by its payload
    bool: lambda value: b"T" if value else b"F",
    type(None): lambda value: b"N",
    bytes: lambda value: b"b" + _LENGTH.pack(len(value)) + value,
    bytearray: lambda value: b"B" + _LENGTH.pack(len(value)) + bytes(value),
    complex: lambda value: b"c" + _COMPLEX.pack(value.real, value.imag),
}


def _digest(data):
    return hashlib.blake2b(data, digest_size=16).digest()


def _flat(items):
    """The encoding of items that are all plain scalars, or None: the fast path for lists, tuples, dict items."""
    try:
        return b"".join([_SCALARS[type(item)](item) for item in items])
    except KeyError:
        return None


def args_digest(arg):
    """A 16-byte identity of one job's argument, so a record is reused only for the same input."""
    return _args_digest(arg, {})


def args_digests(args):
    """args_digest of each argument, encoding each of the user's classes and functions once for the whole list
    (100,000 instances of one notebook class hash the class once). The memo lives for this call only: a class
    edited before the next call is hashed again."""
    shared = {}
    return [_args_digest(arg, shared) for arg in args]


def _args_digest(arg, shared):
    kind = type(arg)
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return _digest(scalar(arg))
    if kind is tuple:
        flat = _flat(arg)
        if flat is not None:
            return _digest(b"t" + _LENGTH.pack(len(arg)) + flat)
    encoder = _Encoder(shared)
    try:
        encoder.encode(arg)
    except RecursionError:
        raise UsageError(f"a job argument of type {type(arg).__name__} nests too deeply to be identified; pass "
                         "flatter data (numbers, strings, tuples, arrays)") from None
    return encoder.digest()


def code_fingerprint(obj):
    """A hash of what the job would run: the user's code and data by value, libraries by name and version, so
    an edit anywhere the job can reach changes it and moving lines or restarting the kernel does not."""
    try:
        return _code_digest(obj, {}).hex()
    except RecursionError:
        raise UsageError(f"{type(obj).__name__} reaches values nested too deeply to fingerprint; capture "
                         "flatter data") from None


def _code_digest(obj, shared):
    encoder = _CodeEncoder(shared)
    encoder.encode(obj)
    return encoder.digest()


class _Encoder:
    """Builds the canonical encoding of one value; the user's classes and functions by the digest of their code,
    libraries' by reference.

    Every container and object is a node: its own encoding is hashed apart and the node is written as that
    digest, remembered by id() for this call, so a part shared many times (a DAG, [x, x]) is encoded once and
    [a, a] still equals [a, copy(a)]. A node met again while it is being encoded (a cycle) is written as its
    number in the order nodes were entered, which is the same on every rank because the traversal order is.
    """

    def __init__(self, shared=None):
        self._buffer = bytearray()
        self._path = {}  # id -> entry number of the nodes being encoded
        self._count = 0
        self._memo = {}  # id -> (digest, node) of the nodes encoded so far (the node is kept alive)
        self._memo_log = []  # ids in the order they were memoised, so a member's entries can be dropped
        # id -> (digest, object): the code digests and module sources of one call (args_digests shares them)
        self._shared = {} if shared is None else shared

    def digest(self):
        return _digest(self._buffer)

    def _node(self, obj, write):
        """Encode obj with write(obj) into its own digest, or write what identifies it already."""
        key = id(obj)
        known = self._memo.get(key)
        if known is not None:
            self._buffer += b"=" + known[0]
            return
        number = self._path.get(key)
        if number is not None:
            self._buffer += b"r" + _LENGTH.pack(number)
            return
        self._path[key] = self._count
        self._count += 1
        outer, self._buffer = self._buffer, bytearray()
        try:
            write(obj)
            digest = _digest(self._buffer)
        finally:
            self._buffer = outer
            del self._path[key]
        self._remember(key, digest, obj)
        outer += b"=" + digest

    def _remember(self, key, digest, obj):
        self._memo[key] = (digest, obj)
        self._memo_log.append(key)

    def _part_digest(self, value):
        """The digest of a member of an unordered container encoded on its own: nothing it numbers or memoises
        is seen by the next member, so the members' (hash) order cannot change how any of them is encoded."""
        count, logged = self._count, len(self._memo_log)
        outer, self._buffer = self._buffer, bytearray()
        try:
            self.encode(value)
            return _digest(self._buffer)
        finally:
            self._buffer = outer
            self._count = count
            for key in self._memo_log[logged:]:
                del self._memo[key]
            del self._memo_log[logged:]

    def _form(self, value):
        """How a set element or dict key is written and sorted: a plain scalar (or flat tuple) by its bytes,
        anything else by its part digest."""
        scalar = _SCALARS.get(type(value))
        if scalar is not None:
            return scalar(value)
        if type(value) is tuple:
            flat = _flat(value)
            if flat is not None:
                return b"t" + _LENGTH.pack(len(value)) + flat
        return b"k" + self._part_digest(value)

    def encode(self, value):
        kind = type(value)
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            self._buffer += scalar(value)
        elif kind is tuple:
            flat = _flat(value)
            if flat is not None:
                self._buffer += b"t" + _LENGTH.pack(len(value)) + flat
            else:
                self._node(value, self._write_sequence)
        elif kind is list:
            self._node(value, self._write_sequence)
        elif kind is dict:
            self._encode_mapping(value, value.items())
        elif kind is set:
            self._node(value, functools.partial(self._write_set, b"S"))
        elif kind is frozenset:
            self._node(value, functools.partial(self._write_set, b"Z"))
        elif kind is OrderedDict:
            self._node(value, functools.partial(self._write_ordered_items, value.items()))
        else:
            self._encode_other(value)

    def _write_sequence(self, items):
        self._buffer += (b"t" if type(items) is tuple else b"l") + _LENGTH.pack(len(items))
        flat = _flat(items)
        if flat is not None:
            self._buffer += flat
        else:
            for item in items:
                self.encode(item)

    def _write_ordered_items(self, pairs, owner):
        pairs = list(pairs)
        self._buffer += b"o" + _LENGTH.pack(len(pairs))
        for key, item in pairs:
            self.encode(key)
            self.encode(item)

    def _write_set(self, tag, members):
        forms = sorted(self._form(item) for item in members)
        self._buffer += tag + _LENGTH.pack(len(forms)) + b"".join(forms)

    def _encode_mapping(self, owner, pairs):
        self._node(owner, functools.partial(self._write_mapping, pairs))

    def _write_mapping(self, pairs, owner):
        """Dicts compare without order: items sorted by their key's form, values then encoded in that order.
        Two keys with one form (two NaNs, two equal objects that hash by id) leave the order open: then each
        item is encoded on its own and the items are sorted by their digests."""
        items = sorted(((self._form(key), key, value) for key, value in pairs), key=_first)
        if any(items[i][0] == items[i + 1][0] for i in range(len(items) - 1)):
            digests = sorted(self._part_digest((key, value)) for _, key, value in items)
            self._buffer += b"e" + _LENGTH.pack(len(digests)) + b"".join(digests)
            return
        self._buffer += b"d" + _LENGTH.pack(len(items))
        for form, _, value in items:
            self._buffer += form
            self.encode(value)

    def _encode_other(self, value):
        numpy = sys.modules.get("numpy")
        if isinstance(value, type):
            self._encode_class(value)
        elif isinstance(value, types.FunctionType):
            self._encode_function(value)
        elif isinstance(value, types.BuiltinFunctionType):
            owner = value.__self__
            if owner is None or isinstance(owner, types.ModuleType):
                self._encode_builtin(value)
            else:
                self._buffer += b"m" + _str_bytes(value.__name__)
                self.encode(owner)
        elif isinstance(value, types.MethodType):
            self._buffer += b"h"
            self.encode(value.__func__)
            self.encode(value.__self__)
        elif isinstance(value, types.ModuleType):
            self._encode_module(value)
        elif isinstance(value, types.CodeType):
            self._encode_code(value)
        elif isinstance(value, (staticmethod, classmethod)):
            self._buffer += b"D" + _str_bytes(type(value).__name__)
            self.encode(value.__func__)
        elif isinstance(value, property):
            self._buffer += b"p"
            for accessor in (value.fget, value.fset, value.fdel):
                self.encode(accessor)
        elif isinstance(value, functools.cached_property):
            self._buffer += b"q"
            self.encode(value.func)
        elif numpy is not None and (type(value) is numpy.ndarray or isinstance(value, numpy.memmap)):
            self._encode_array(numpy, value)
        elif numpy is not None and isinstance(value, numpy.generic):
            self._buffer += b"g" + _str_bytes(value.dtype.str) + _LENGTH.pack(value.nbytes) + value.tobytes()
        elif isinstance(value, (set, frozenset)):
            self._node(value, self._write_set_subclass)
        elif isinstance(value, types.MappingProxyType):  # a read-only dict (dataclass field metadata)
            self._encode_mapping(value, value.items())
        else:
            self._encode_reduced(value)

    def _encode_reference(self, tag, obj):
        """A class or function by where it is defined: module and qualified name."""
        module = getattr(obj, "__module__", None) or ""
        qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "")
        self._buffer += tag + _str_bytes(str(module)) + _str_bytes(str(qualname))

    def _encode_by_code(self, obj):
        """The user's class or function in an argument: by the digest of its code, as the fingerprint sees it,
        so two closures of one factory or an edited class are different arguments."""
        known = self._shared.get(id(obj))
        if known is None:
            known = self._shared[id(obj)] = (_code_digest(obj, self._shared), obj)
        self._buffer += b"V" + known[0]

    def _encode_class(self, cls):
        if _is_library(getattr(cls, "__module__", None)):
            self._encode_reference(b"C", cls)
        else:
            self._encode_by_code(cls)

    def _encode_function(self, fn):
        if _is_library(getattr(fn, "__module__", None)):
            self._encode_reference(b"P", fn)
        else:
            self._encode_by_code(fn)

    def _encode_builtin(self, fn):
        self._encode_reference(b"P", fn)

    def _encode_module(self, module):
        """A library module by name; the user's by name and the digest of its source file, so editing
        helpers.py next to the notebook changes what reaches it."""
        name = module.__name__
        if _is_library(name):
            self._buffer += b"M" + _str_bytes(name)
            return
        known = self._shared.get(id(module))
        if known is None:
            known = self._shared[id(module)] = (_source_digest(module), module)
        if known[0] is None:
            self._buffer += b"M" + _str_bytes(name)
        else:
            self._buffer += b"u" + _str_bytes(name) + known[0]

    def _encode_code(self, code):
        """Bytecode and what it refers to, never line numbers or file names."""
        self._buffer += b"X" + b"".join(_LENGTH.pack(n) for n in (
            code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags))
        code_bytes = code.co_code
        table = getattr(code, "co_exceptiontable", b"")
        self._buffer += _LENGTH.pack(len(code_bytes)) + code_bytes + _LENGTH.pack(len(table)) + table
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            self.encode(names)
        self.encode(code.co_consts)

    def _encode_array(self, numpy, array):
        dtype = array.dtype
        if dtype.names is None and not dtype.hasobject:  # a leaf: hashed in place, once per call
            known = self._memo.get(id(array))
            if known is None:
                data = hashlib.blake2b(digest_size=16)
                data.update(b"A" + _str_bytes(dtype.str) + _shape_bytes(array))
                _feed_array(numpy, data, array)
                known = (data.digest(), array)
                self._remember(id(array), *known)
            self._buffer += b"=" + known[0]
        else:
            self._node(array, functools.partial(self._write_array, numpy))

    def _write_array(self, numpy, array):
        dtype = array.dtype
        if dtype.names is not None:
            self._buffer += b"a"
            self.encode(dtype.descr)
            self._buffer += _shape_bytes(array)
            for name in dtype.names:  # field by field: the padding between fields is not data
                self.encode(array[name])
        else:
            self._buffer += b"O" + _shape_bytes(array)
            for item in array.reshape(-1).tolist():
                self.encode(item)

    def _write_set_subclass(self, value):
        self._buffer += b"Q"
        self._encode_class(type(value))
        self._write_set(b"S", value)
        self.encode(getattr(value, "__dict__", None))

    def _encode_reduced(self, value):
        """Everything else as pickle would rebuild it: reconstructor (the user's by its code, a library's by
        reference), args (where a class stands), state, items."""
        try:
            reducer = copyreg.dispatch_table.get(type(value))  # as pickle does: re.Pattern, registered types
            reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
        except Exception as exc:  # noqa: BLE001 - a type's own __reduce_ex__ may raise anything: unsupported
            self._unsupported(value, exc)
            return
        if isinstance(reduced, str):  # a module global, pickled by name
            self._buffer += b"G" + _str_bytes(str(getattr(value, "__module__", None) or "")) + _str_bytes(reduced)
            return
        self._node(value, functools.partial(self._write_reduced, reduced))

    def _write_reduced(self, reduced, value):
        reconstruct, args, state, list_items, dict_items, setter = (tuple(reduced) + (None,) * 6)[:6]
        self._buffer += b"R"
        self.encode(reconstruct)
        self._encode_inline(args)
        self._encode_inline(state)
        self.encode(None if list_items is None else list(list_items))
        if dict_items is None:
            self._buffer += b"N"
        elif isinstance(value, OrderedDict):
            self._write_ordered_items(dict_items, value)
        else:
            pairs = list(dict_items)
            self._encode_mapping(pairs, pairs)
        self.encode(setter)

    def _encode_inline(self, value):
        """The args and state pickle made for one object are written inside its node, not as nodes of their own:
        they belong to that object alone, so there is nothing to share or memoise (a third less work per
        instance)."""
        if type(value) is tuple:
            self._write_sequence(value)
        elif type(value) is dict:
            self._write_mapping(value.items(), value)
        else:
            self.encode(value)

    def _unsupported(self, value, exc):
        kind = type(value)
        raise UsageError(
            f"a job argument contains a {kind.__module__}.{kind.__qualname__}, which cannot be pickled "
            f"({type(exc).__name__}: {exc}); arguments are stored with the results, so pass plain "
            "data (numbers, strings, tuples, lists, dicts, arrays, dataclasses) and create this object inside "
            "the job function") from exc


class _CodeEncoder(_Encoder):
    """The fingerprint's encoder: the user's classes and functions by value, as nodes (a helper reached by many
    paths is hashed once, recursion ends at its entry number); libraries by reference."""

    def _encode_library_reference(self, tag, obj):
        self._encode_reference(tag, obj)
        self._buffer += _str_bytes(_library_version(getattr(obj, "__module__", None)))

    def _encode_builtin(self, fn):
        self._encode_library_reference(b"P", fn)

    def _encode_class(self, cls):
        if _is_library(getattr(cls, "__module__", None)):
            self._encode_library_reference(b"C", cls)
        else:
            self._node(cls, self._write_class)

    def _write_class(self, cls):
        self._buffer += b"K" + _str_bytes(cls.__qualname__)
        self.encode(cls.__bases__)
        self.encode(type(cls) if type(cls) is not type else None)
        names = sorted(name for name, attr in vars(cls).items()
                       if name not in _SKIPPED_CLASS_ATTRS and not isinstance(attr, _SLOT_DESCRIPTORS))
        self._buffer += _LENGTH.pack(len(names))
        for name in names:
            self._buffer += _str_bytes(name)
            self.encode(vars(cls)[name])

    def _encode_function(self, fn):
        if _is_library(getattr(fn, "__module__", None)):
            self._encode_library_reference(b"P", fn)
        else:
            self._node(fn, self._write_function)

    def _write_function(self, fn):
        self._buffer += b"W"
        self._encode_code(fn.__code__)
        self.encode(fn.__defaults__)
        self.encode(fn.__kwdefaults__)
        cells = tuple(_cell_value(cell) for cell in fn.__closure__ or ())
        self.encode(cells)
        self.encode(getattr(fn, "__dict__", None) or None)  # attributes, and __wrapped__ set by functools.wraps
        namespace = fn.__globals__
        code_names = _code_names(fn.__code__)
        names = sorted(name for name in code_names if name in namespace)
        self._buffer += _LENGTH.pack(len(names))
        for name in names:
            self._buffer += _str_bytes(name)
            self.encode(namespace[name])
        self._encode_module_attributes([namespace[name] for name in names] + list(cells), code_names)

    def _encode_module_attributes(self, values, code_names):
        """The attributes of the user's modules that the code names (``helpers.f``), by value: the module's
        source covers edits to its file, this covers what is in memory (a reassigned ``helpers.f``)."""
        pending = {value.__name__: value for value in values
                   if isinstance(value, types.ModuleType) and not _is_library(value.__name__)}
        done = set()
        while pending:
            name = min(pending)
            module = pending.pop(name)
            done.add(name)
            namespace = vars(module)
            attributes = sorted(code_names.intersection(namespace))
            self._buffer += b"x" + _str_bytes(name) + _LENGTH.pack(len(attributes))
            for attribute in attributes:
                value = namespace[attribute]
                self._buffer += _str_bytes(attribute)
                self.encode(value)
                if (isinstance(value, types.ModuleType) and value.__name__ not in done
                        and not _is_library(value.__name__)):
                    pending[value.__name__] = value

    def _encode_other(self, value):
        if not isinstance(value, (type, types.FunctionType, types.MethodType)):
            try:  # the instance's own attribute only: a user __getattr__ could invent one on every access
                wrapped = vars(value).get("__wrapped__")
            except (TypeError, AttributeError):  # no __dict__, or one that is not a mapping
                wrapped = None
            if wrapped is not None and wrapped is not value:
                self._buffer += b"w"  # lru_cache and other wrappers pickle by name: hash what they wrap
                self.encode(wrapped)
        super()._encode_other(value)

    def _unsupported(self, value, exc):
        kind = type(value)
        log.debug("fingerprint: %s.%s cannot be encoded (%s: %s); it counts by its type only",
                  kind.__module__, kind.__qualname__, type(exc).__name__, exc)
        self._buffer += b"U" + _str_bytes(kind.__module__) + _str_bytes(kind.__qualname__)


def _first(item):
    return item[0]


def _shape_bytes(array):
    return _LENGTH.pack(array.ndim) + b"".join(_LENGTH.pack(n) for n in array.shape)


def _feed_array(numpy, data, array):
    """C-order bytes: contiguous memory as is, otherwise copied a chunk at a time (a view equals its copy)."""
    if array.flags.c_contiguous:
        data.update(array.reshape(-1).view(numpy.uint8))
        return
    row_bytes = array.nbytes // array.shape[0]
    if row_bytes >= _ARRAY_CHUNK:
        for row in array:
            _feed_array(numpy, data, row)
        return
    step = max(1, _ARRAY_CHUNK // row_bytes)
    for start in range(0, array.shape[0], step):
        chunk = numpy.ascontiguousarray(array[start:start + step])
        data.update(chunk.reshape(-1).view(numpy.uint8))


def _source_digest(module):
    """blake2b of the module's file (a package's ``__init__.py``); None when there is no file to read."""
    location = getattr(module, "__file__", None)
    try:
        with open(location, "rb") as source:
            return hashlib.file_digest(source, lambda: hashlib.blake2b(digest_size=16)).digest()
    except (OSError, TypeError) as exc:
        log.debug("identity: the source of module %s cannot be read (%s); it counts by its name only",
                  module.__name__, exc)
        return None


class _Empty:
    """Stands for a closure cell not filled yet (a function that refers to itself before it is defined)."""

    def __reduce__(self):
        return "_EMPTY_CELL"


_EMPTY_CELL = _Empty()


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY_CELL


def _code_names(code):
    """Global (and attribute) names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=1)
def _library_roots():
    paths = sysconfig.get_paths()
    roots = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # site of some embedded or old virtualenv builds lacks these
        pass
    return tuple(sorted({os.path.realpath(root) + os.sep for root in roots if root}))


_library_modules = {}


def _is_library(module_name):
    """True for the stdlib, builtins and installed packages (hashed by reference); False for ``__main__`` and
    the user's own modules, whose code is hashed by value."""
    if not module_name or module_name in ("__main__", "__mpimap__"):
        return False
    known = _library_modules.get(module_name)
    if known is not None:
        return known
    module = sys.modules.get(module_name) or sys.modules.get(module_name.partition(".")[0])
    if module is None:
        return False  # not imported under that name: hash by value, the safe side
    location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None)
    library = location is None or os.path.realpath(location).startswith(_library_roots())
    _library_modules[module_name] = library
    return library


def _library_version(module_name):
    top = sys.modules.get((module_name or "").partition(".")[0])
    version = getattr(top, "__version__", None)
    return version if isinstance(version, str) else ""
