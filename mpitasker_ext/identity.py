"""The two identities the cache rests on: the argument digest and the code fingerprint.

Both are blake2b over one canonical, type-tagged, length-prefixed encoding of a value (``encoding``), so they are
the same in every process and every kernel: nothing depends on the hash seed, on memory addresses or on pickle's
memo. Both hash the user's own code by value (what the job will run; in an argument, a closure or the class of an
instance) and installed libraries by reference; a user module by its source (``fingerprint`` decides what is
the user's). Shared parts are hashed once per call. See docs/design.md, "Identities", for the rules and why each
decision was taken.
"""

from .encoding import LENGTH, SCALARS, digest_of, flat_encoding
from .errors import UsageError
from .fingerprint import ArgumentEncoder, code_digest

__all__ = ["args_digest", "args_digests", "code_fingerprint"]


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
    scalar = SCALARS.get(kind)
    if scalar is not None:
        return digest_of(scalar(arg))
    if kind is tuple:
        items = flat_encoding(arg)
        if items is not None:
            return digest_of(b"t" + LENGTH.pack(len(arg)) + items)
    encoder = ArgumentEncoder(shared)
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
        return code_digest(obj, {}).hex()
    except RecursionError:
        raise UsageError(f"{type(obj).__name__} reaches values nested too deeply to fingerprint; capture "
                         "flatter data") from None
