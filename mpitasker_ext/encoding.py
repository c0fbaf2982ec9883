"""The canonical encoding of a value, which both identities hash (see ``identity``).

Every item is a type tag, then a fixed-size value or a length prefix and the bytes, so two different values never
share an encoding and the same value encodes the same in every process: nothing depends on the hash seed, on
memory addresses or on pickle's memo. ``Encoder`` writes classes, functions and modules by reference; how the
user's own code is written instead (by value) is ``fingerprint``'s decision.
"""

import copyreg
import functools
import hashlib
import struct
import sys
import types
from collections import OrderedDict

from .errors import UsageError

LENGTH = struct.Struct("<Q")
_INT64 = struct.Struct("<q")
_FLOAT = struct.Struct("<d")
_COMPLEX = struct.Struct("<dd")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ARRAY_CHUNK = 1 << 20  # bytes of a non-contiguous array copied at a time


def _int_bytes(value):
    if _INT64_MIN <= value <= _INT64_MAX:
        return b"i" + _INT64.pack(value)
    size = (value.bit_length() + 8) // 8
    return b"I" + LENGTH.pack(size) + value.to_bytes(size, "little", signed=True)


def str_bytes(value):
    data = value.encode("utf-8", "surrogatepass")
    return b"s" + LENGTH.pack(len(data)) + data


SCALARS = {
    int: _int_bytes,
    str: str_bytes,
    float: lambda value: b"f" + _FLOAT.pack(value),  # IEEE bits: -0.0 and 0.0 differ, NaN by its payload
    bool: lambda value: b"T" if value else b"F",
    type(None): lambda value: b"N",
    bytes: lambda value: b"b" + LENGTH.pack(len(value)) + value,
    bytearray: lambda value: b"B" + LENGTH.pack(len(value)) + bytes(value),
    complex: lambda value: b"c" + _COMPLEX.pack(value.real, value.imag),
}


def digest_of(data):
    return hashlib.blake2b(data, digest_size=16).digest()


def flat_encoding(items):
    """The encoding of items that are all plain scalars, or None: the fast path for lists, tuples, dict items."""
    try:
        return b"".join([SCALARS[type(item)](item) for item in items])
    except KeyError:
        return None


class Encoder:
    """Builds the canonical encoding of one value; classes, functions and modules by reference (subclasses in
    ``fingerprint`` write the user's own by value).

    Every container and object is a node: its own encoding is hashed apart and the node is written as that
    digest, remembered by id() for this call, so a part shared many times (a DAG, [x, x]) is encoded once and
    [a, a] still equals [a, copy(a)]. A node met again while it is being encoded (a cycle) is written as its
    number in the order nodes were entered, which is the same on every rank because the traversal order is.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._path = {}  # id -> entry number of the nodes being encoded
        self._count = 0
        self._memo = {}  # id -> (digest, node) of the nodes encoded so far (the node is kept alive)
        self._memo_log = []  # ids in the order they were memoised, so a member's entries can be dropped

    def digest(self):
        return digest_of(self._buffer)

    def _node(self, obj, write):
        """Encode obj with write(obj) into its own digest, or write what identifies it already."""
        key = id(obj)
        known = self._memo.get(key)
        if known is not None:
            self._buffer += b"=" + known[0]
            return
        number = self._path.get(key)
        if number is not None:
            self._buffer += b"r" + LENGTH.pack(number)
            return
        self._path[key] = self._count
        self._count += 1
        outer, self._buffer = self._buffer, bytearray()
        try:
            write(obj)
            digest = digest_of(self._buffer)
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
            return digest_of(self._buffer)
        finally:
            self._buffer = outer
            self._count = count
            for key in self._memo_log[logged:]:
                del self._memo[key]
            del self._memo_log[logged:]

    def _form(self, value):
        """How a set element or dict key is written and sorted: a plain scalar (or flat tuple) by its bytes,
        anything else by its part digest."""
        scalar = SCALARS.get(type(value))
        if scalar is not None:
            return scalar(value)
        if type(value) is tuple:
            flat = flat_encoding(value)
            if flat is not None:
                return b"t" + LENGTH.pack(len(value)) + flat
        return b"k" + self._part_digest(value)

    def encode(self, value):
        kind = type(value)
        scalar = SCALARS.get(kind)
        if scalar is not None:
            self._buffer += scalar(value)
        elif kind is tuple:
            flat = flat_encoding(value)
            if flat is not None:
                self._buffer += b"t" + LENGTH.pack(len(value)) + flat
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
        self._buffer += (b"t" if type(items) is tuple else b"l") + LENGTH.pack(len(items))
        flat = flat_encoding(items)
        if flat is not None:
            self._buffer += flat
        else:
            for item in items:
                self.encode(item)

    def _write_ordered_items(self, pairs, owner):
        pairs = list(pairs)
        self._buffer += b"o" + LENGTH.pack(len(pairs))
        for key, item in pairs:
            self.encode(key)
            self.encode(item)

    def _write_set(self, tag, members):
        forms = sorted(self._form(item) for item in members)
        self._buffer += tag + LENGTH.pack(len(forms)) + b"".join(forms)

    def _encode_mapping(self, owner, pairs):
        self._node(owner, functools.partial(self._write_mapping, pairs))

    def _write_mapping(self, pairs, owner):
        """Dicts compare without order: items sorted by their key's form, values then encoded in that order.
        Two keys with one form (two NaNs, two equal objects that hash by id) leave the order open: then each
        item is encoded on its own and the items are sorted by their digests."""
        items = sorted(((self._form(key), key, value) for key, value in pairs), key=_first)
        if any(items[i][0] == items[i + 1][0] for i in range(len(items) - 1)):
            digests = sorted(self._part_digest((key, value)) for _, key, value in items)
            self._buffer += b"e" + LENGTH.pack(len(digests)) + b"".join(digests)
            return
        self._buffer += b"d" + LENGTH.pack(len(items))
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
                self._buffer += b"m" + str_bytes(value.__name__)
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
            self._buffer += b"D" + str_bytes(type(value).__name__)
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
            self._buffer += b"g" + str_bytes(value.dtype.str) + LENGTH.pack(value.nbytes) + value.tobytes()
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
        self._buffer += tag + str_bytes(str(module)) + str_bytes(str(qualname))

    def _encode_class(self, cls):
        self._encode_reference(b"C", cls)

    def _encode_function(self, fn):
        self._encode_reference(b"P", fn)

    def _encode_builtin(self, fn):
        self._encode_reference(b"P", fn)

    def _encode_module(self, module):
        self._buffer += b"M" + str_bytes(module.__name__)

    def _encode_code(self, code):
        """Bytecode and what it refers to, never line numbers or file names."""
        self._buffer += b"X" + b"".join(LENGTH.pack(n) for n in (
            code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags))
        code_bytes = code.co_code
        table = getattr(code, "co_exceptiontable", b"")
        self._buffer += LENGTH.pack(len(code_bytes)) + code_bytes + LENGTH.pack(len(table)) + table
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            self.encode(names)
        self.encode(code.co_consts)

    def _encode_array(self, numpy, array):
        dtype = array.dtype
        if dtype.names is None and not dtype.hasobject:  # a leaf: hashed in place, once per call
            known = self._memo.get(id(array))
            if known is None:
                data = hashlib.blake2b(digest_size=16)
                data.update(b"A" + str_bytes(dtype.str) + _shape_bytes(array))
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
            self._buffer += b"G" + str_bytes(str(getattr(value, "__module__", None) or "")) + str_bytes(reduced)
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


def _first(item):
    return item[0]


def _shape_bytes(array):
    return LENGTH.pack(array.ndim) + b"".join(LENGTH.pack(n) for n in array.shape)


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

