"""The two identities the cache rests on: the argument digest and the code fingerprint.

Both are blake2b over one canonical, type-tagged, length-prefixed encoding of a value, so they are the same in
every process and every kernel: nothing depends on the hash seed, on memory addresses or on pickle's memo.
The argument digest names classes and functions by reference (data identity); the fingerprint hashes the
user's own code by value (what the job will run) and installed libraries by reference. See docs/design.md,
"Identities", for the rules and why each decision was taken.
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
    kind = type(arg)
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return _digest(scalar(arg))
    if kind is tuple:
        flat = _flat(arg)
        if flat is not None:
            return _digest(b"t" + _LENGTH.pack(len(arg)) + flat)
    encoder = _Encoder()
    try:
        encoder.encode(arg)
    except RecursionError:
        raise UsageError(f"a job argument of type {type(arg).__name__} nests too deeply to be identified; pass "
                         "flatter data (numbers, strings, tuples, arrays)") from None
    return encoder.digest()


def code_fingerprint(obj):
    """A hash of what the job would run: the user's code and data by value, libraries by name and version, so
    an edit anywhere the job can reach changes it and moving lines or restarting the kernel does not."""
    encoder = _CodeEncoder()
    try:
        encoder.encode(obj)
    except RecursionError:
        raise UsageError(f"{type(obj).__name__} reaches values nested too deeply to fingerprint; capture "
                         "flatter data") from None
    return encoder.digest().hex()


class _Encoder:
    """Streams the canonical encoding of one value into blake2b; classes and functions by reference."""

    def __init__(self, path=None):
        self._hash = hashlib.blake2b(digest_size=16)
        self._buffer = bytearray()
        # Containers being encoded, from the outermost: a value met again here is a cycle and becomes a
        # back-reference to its depth. Only the current path counts, so shared (acyclic) parts are encoded each
        # time and [a, a] has the digest of [a, copy(a)].
        self._path = {} if path is None else path

    def digest(self):
        self._flush()
        return self._hash.digest()

    def _flush(self):
        if self._buffer:
            self._hash.update(self._buffer)
            self._buffer.clear()

    def _child(self):
        return _Encoder(self._path)

    def _part_digest(self, *values):
        """The digest of values encoded apart, for members of unordered containers (sorted by digest)."""
        flat = _flat(values)
        if flat is not None:
            return _digest(flat)
        part = self._child()
        for value in values:
            part.encode(value)
        return part.digest()

    def _enter(self, obj):
        """Push a container on the path; False (after writing a back-reference) when it is already there."""
        entered = self._path.get(id(obj))
        if entered is not None:
            self._buffer += b"r" + _LENGTH.pack(entered[0])
            return False
        self._path[id(obj)] = (len(self._path), obj)
        return True

    def _leave(self, obj):
        del self._path[id(obj)]

    def encode(self, value):
        kind = type(value)
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            self._buffer += scalar(value)
        elif kind is tuple:
            self._buffer += b"t" + _LENGTH.pack(len(value))
            flat = _flat(value)
            if flat is not None:
                self._buffer += flat
            else:
                for item in value:
                    self.encode(item)
        elif kind is list:
            self._encode_sequence(b"l", value)
        elif kind is dict:
            self._encode_unordered(b"d", value, value.items())
        elif kind is set:
            self._encode_unordered(b"S", value, ((item,) for item in value))
        elif kind is frozenset:
            self._encode_unordered(b"Z", value, ((item,) for item in value))
        elif kind is OrderedDict:
            self._encode_ordered_items(b"o", value, value.items())
        else:
            self._encode_other(value)

    def _encode_sequence(self, tag, items):
        if self._enter(items):
            self._buffer += tag + _LENGTH.pack(len(items))
            flat = _flat(items)
            if flat is not None:
                self._buffer += flat
            else:
                for item in items:
                    self.encode(item)
            self._leave(items)

    def _encode_ordered_items(self, tag, owner, pairs):
        if self._enter(owner):
            pairs = list(pairs)
            self._buffer += tag + _LENGTH.pack(len(pairs))
            for key, item in pairs:
                self.encode(key)
                self.encode(item)
            self._leave(owner)

    def _encode_unordered(self, tag, owner, members):
        """Sets and dicts compare without order: their members (dict items) sorted by digest."""
        if self._enter(owner):
            digests = sorted(self._part_digest(*member) for member in members)
            self._buffer += tag + _LENGTH.pack(len(digests)) + b"".join(digests)
            self._leave(owner)

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
            self._buffer += b"M" + _str_bytes(value.__name__)
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
            self._encode_set_subclass(value)
        elif isinstance(value, types.MappingProxyType):  # a read-only dict (dataclass field metadata)
            self._encode_unordered(b"d", value, value.items())
        else:
            self._encode_reduced(value)

    def _encode_reference(self, tag, obj):
        """A class or function by where it is defined: module and qualified name."""
        module = getattr(obj, "__module__", None) or ""
        qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "")
        self._buffer += tag + _str_bytes(str(module)) + _str_bytes(str(qualname))

    def _encode_class(self, cls):
        self._encode_reference(b"C", cls)

    def _encode_function(self, fn):
        self._encode_reference(b"P", fn)

    def _encode_builtin(self, fn):
        self._encode_reference(b"P", fn)

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
        shape = _LENGTH.pack(array.ndim) + b"".join(_LENGTH.pack(n) for n in array.shape)
        if dtype.names is not None:
            self._buffer += b"a"
            self.encode(dtype.descr)
            self._buffer += shape
            for name in dtype.names:  # field by field: the padding between fields is not data
                self.encode(array[name])
        elif dtype.hasobject:
            if self._enter(array):
                self._buffer += b"O" + shape
                for item in array.reshape(-1).tolist():
                    self.encode(item)
                self._leave(array)
        else:
            self._buffer += b"A" + _str_bytes(dtype.str) + shape
            self._flush()
            self._feed_array(numpy, array)

    def _feed_array(self, numpy, array):
        """C-order bytes: contiguous memory as is, otherwise copied a chunk at a time (a view equals its copy)."""
        if array.flags.c_contiguous:
            self._hash.update(array.reshape(-1).view(numpy.uint8))
            return
        row_bytes = array.nbytes // array.shape[0]
        if row_bytes >= _ARRAY_CHUNK:
            for row in array:
                self._feed_array(numpy, row)
            return
        step = max(1, _ARRAY_CHUNK // row_bytes)
        for start in range(0, array.shape[0], step):
            chunk = numpy.ascontiguousarray(array[start:start + step])
            self._hash.update(chunk.reshape(-1).view(numpy.uint8))

    def _encode_set_subclass(self, value):
        self._buffer += b"Q"
        self._encode_class(type(value))
        self._encode_unordered(b"S", value, ((item,) for item in value))
        self.encode(getattr(value, "__dict__", None))

    def _encode_reduced(self, value):
        """Everything else as pickle would rebuild it: reconstructor by reference, args, state, items."""
        try:
            reducer = copyreg.dispatch_table.get(type(value))  # as pickle does: re.Pattern, registered types
            reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
        except Exception as exc:  # noqa: BLE001 - a type's own __reduce_ex__ may raise anything: unsupported
            self._unsupported(value, exc)
            return
        if isinstance(reduced, str):  # a module global, pickled by name
            self._buffer += b"G" + _str_bytes(str(getattr(value, "__module__", None) or "")) + _str_bytes(reduced)
            return
        if not self._enter(value):
            return
        try:
            reconstruct, args, state, list_items, dict_items, setter = (tuple(reduced) + (None,) * 6)[:6]
            self._buffer += b"R"
            self.encode(reconstruct)
            self.encode(args)
            self.encode(state)
            self.encode(None if list_items is None else list(list_items))
            if dict_items is None:
                self._buffer += b"N"
            elif isinstance(value, OrderedDict):
                self._encode_ordered_items(b"o", value, dict_items)
            else:
                pairs = list(dict_items)
                self._encode_unordered(b"d", pairs, pairs)
            self.encode(setter)
        finally:
            self._leave(value)

    def _unsupported(self, value, exc):
        kind = type(value)
        raise UsageError(
            f"a job argument contains a {kind.__module__}.{kind.__qualname__}, which cannot be pickled "
            f"({type(exc).__name__}: {exc}); arguments are stored with the results, so pass plain "
            "data (numbers, strings, tuples, lists, dicts, arrays, dataclasses) and create this object inside "
            "the job function") from exc


class _CodeEncoder(_Encoder):
    """The fingerprint's encoder: the user's classes and functions by value, libraries by reference."""

    def __init__(self, path=None, visited=None):
        super().__init__(path)
        # Classes and functions already encoded, in order of first visit: later visits write that number, so a
        # helper reached by many paths is hashed once and mutual recursion ends.
        self._visited = {} if visited is None else visited

    def _child(self):
        # A copy: members of a set are encoded in hash order, so what one of them visits must not change how
        # the next one is encoded.
        return _CodeEncoder(self._path, dict(self._visited))

    def _first_visit(self, obj):
        seen = self._visited.get(id(obj))
        if seen is not None:
            self._buffer += b"v" + _LENGTH.pack(seen[0])
            return False
        self._visited[id(obj)] = (len(self._visited), obj)
        return True

    def _encode_library_reference(self, tag, obj):
        self._encode_reference(tag, obj)
        self._buffer += _str_bytes(_library_version(getattr(obj, "__module__", None)))

    def _encode_builtin(self, fn):
        self._encode_library_reference(b"P", fn)

    def _encode_class(self, cls):
        if _is_library(getattr(cls, "__module__", None)):
            self._encode_library_reference(b"C", cls)
            return
        if not self._first_visit(cls):
            return
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
            return
        if not self._first_visit(fn):
            return
        self._buffer += b"W"
        self._encode_code(fn.__code__)
        self.encode(fn.__defaults__)
        self.encode(fn.__kwdefaults__)
        self.encode(tuple(_cell_value(cell) for cell in fn.__closure__ or ()))
        self.encode(getattr(fn, "__dict__", None) or None)  # attributes, and __wrapped__ set by functools.wraps
        namespace = fn.__globals__
        names = sorted(name for name in _code_names(fn.__code__) if name in namespace)
        self._buffer += _LENGTH.pack(len(names))
        for name in names:
            self._buffer += _str_bytes(name)
            self.encode(namespace[name])

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
