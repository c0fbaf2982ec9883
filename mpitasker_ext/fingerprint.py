"""The code fingerprint, and what counts as the user's code: which modules are libraries (hashed by reference)
and how the user's classes, functions and modules are encoded (by value).

``ArgumentEncoder`` writes the user's code met inside an argument as the digest of its code encoding;
``CodeEncoder`` writes it in place, for the fingerprint of what a job runs. See docs/design.md, "Identities".
"""

import functools
import hashlib
import logging
import os
import site
import sys
import sysconfig
import types

from .encoding import LENGTH, Encoder, str_bytes

log = logging.getLogger(__name__)

# Entries of a class's namespace that are layout, documentation or runtime caches, not behaviour
# (copyreg adds __slotnames__ the first time an instance is pickled).
_SKIPPED_CLASS_ATTRS = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__",
                                  "__annotations__", "__firstlineno__", "__static_attributes__", "_abc_impl",
                                  "__slotnames__"})
_SLOT_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType)


def code_digest(obj, shared):
    """The digest of the code encoding of ``obj``; ``shared`` holds what one call already hashed."""
    encoder = CodeEncoder(shared)
    encoder.encode(obj)
    return encoder.digest()


class ArgumentEncoder(Encoder):
    """The encoder of a job's argument: libraries' classes and functions by reference, the user's by the digest
    of their code, the user's modules by their source."""

    def __init__(self, shared=None):
        super().__init__()
        # id -> (digest, object): the code digests and module sources of one call (args_digests shares them)
        self._shared = {} if shared is None else shared

    def _encode_by_code(self, obj):
        """The user's class or function in an argument: by the digest of its code, as the fingerprint sees it,
        so two closures of one factory or an edited class are different arguments."""
        known = self._shared.get(id(obj))
        if known is None:
            known = self._shared[id(obj)] = (code_digest(obj, self._shared), obj)
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

    def _encode_module(self, module):
        """A library module by name; the user's by name and the digest of its source file, so editing
        helpers.py next to the notebook changes what reaches it."""
        name = module.__name__
        if _is_library(name):
            self._buffer += b"M" + str_bytes(name)
            return
        known = self._shared.get(id(module))
        if known is None:
            known = self._shared[id(module)] = (_source_digest(module), module)
        if known[0] is None:
            self._buffer += b"M" + str_bytes(name)
        else:
            self._buffer += b"u" + str_bytes(name) + known[0]


class CodeEncoder(ArgumentEncoder):
    """The fingerprint's encoder: the user's classes and functions by value, as nodes (a helper reached by many
    paths is hashed once, recursion ends at its entry number); libraries by reference."""

    def _encode_library_reference(self, tag, obj):
        self._encode_reference(tag, obj)
        self._buffer += str_bytes(_library_version(getattr(obj, "__module__", None)))

    def _encode_builtin(self, fn):
        self._encode_library_reference(b"P", fn)

    def _encode_class(self, cls):
        if _is_library(getattr(cls, "__module__", None)):
            self._encode_library_reference(b"C", cls)
        else:
            self._node(cls, self._write_class)

    def _write_class(self, cls):
        self._buffer += b"K" + str_bytes(cls.__qualname__)
        self.encode(cls.__bases__)
        self.encode(type(cls) if type(cls) is not type else None)
        names = sorted(name for name, attr in vars(cls).items()
                       if name not in _SKIPPED_CLASS_ATTRS and not isinstance(attr, _SLOT_DESCRIPTORS))
        self._buffer += LENGTH.pack(len(names))
        for name in names:
            self._buffer += str_bytes(name)
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
        self._buffer += LENGTH.pack(len(names))
        for name in names:
            self._buffer += str_bytes(name)
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
            self._buffer += b"x" + str_bytes(name) + LENGTH.pack(len(attributes))
            for attribute in attributes:
                value = namespace[attribute]
                self._buffer += str_bytes(attribute)
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
        self._buffer += b"U" + str_bytes(kind.__module__) + str_bytes(kind.__qualname__)


def _source_digest(module):
    """blake2b of the module's file (a package's ``__init__.py``); None when there is no file to read."""
    location = getattr(module, "__file__", None)
    try:
        with open(location, "rb") as source:
            return hashlib.file_digest(source, lambda: hashlib.blake2b(digest_size=16)).digest()
    except (OSError, TypeError) as exc:
        log.debug("fingerprint: the source of module %s cannot be read (%s); it counts by its name only",
                  module.__name__, exc)
        return None


class _Empty:
    """Stands for a closure cell not filled yet (a function that refers to itself before it is defined)."""

    __module__ = "mpitasker_ext.identity"  # it is encoded by this name: where it lived when fingerprints began

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
