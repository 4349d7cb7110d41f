"""Reading strangers' files safely: confined to their checkpoint, regular files only, never blocking.

A checkpoint directory is hostile until validated. Every file read from one goes through here:

- it must resolve (symlinks followed) inside the checkpoint's *root*: the directory itself, or for a
  Hugging Face hub snapshot (``models--org--name/snapshots/<rev>/``, a folder of symlinks into
  ``../../blobs/``) the repo's cache folder ``models--org--name``;
- it must be a regular file: a FIFO, device, socket or directory is refused without being opened for
  blocking reads (``O_NONBLOCK``, then ``fstat``);
- text files are read with a size cap.

`InputError` is the base of every "this input is bad, here is what to do" error of the library; the
CLI prints it as one line and exits with 2.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

TEXT_LIMIT = 64 << 20  # config, tokenizer, template and index files: far below this in the wild
HEADER_LIMIT = 100 << 20  # safetensors' own cap on the JSON header
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


class InputError(ValueError):
    """Bad input (a file, an argument, a request): the message names the problem and what to do."""


def checkpoint_root(directory: str | os.PathLike) -> Path:
    """The folder a checkpoint's files may resolve into (see the module docstring)."""
    d = Path(os.path.realpath(directory))
    snapshots = Path(os.path.abspath(directory)).parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--")):
        return Path(os.path.realpath(snapshots.parent))
    return d


def plain_name(name: str, what: str) -> str:
    """``name`` if it is a bare file name (no folder, no ``..``, not absolute), else `InputError`."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(f"{what} names the file {name!r}, which is not a plain file name inside the checkpoint")
    return name


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``."""
    real, root = os.path.realpath(path), os.path.realpath(root)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def checked_file(path: str | os.PathLike, root: str | os.PathLike | None = None, what: str = "file") -> Path:
    """``path`` if it exists, is (or links to) a regular file, and resolves inside ``root``; else `InputError`.

    Raises FileNotFoundError when the file does not exist (callers decide whether that is an error).
    """
    path = Path(path)
    if root is not None and not inside(path, root):
        raise InputError(
            f"{what} {path} is a link to {os.path.realpath(path)}, outside the checkpoint; refusing to read it"
        )
    st = os.stat(path)  # follows links; FileNotFoundError when absent or dangling
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise InputError(f"{what} {path} is {kind}; give a regular file")
    return path


def open_regular(path: str | os.PathLike, root=None, what: str = "file"):
    """Open a regular file for binary reading without ever blocking on a FIFO; a Python file object."""
    path = checked_file(path, root, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory; give a regular file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the stat and the open
            raise InputError(f"{what} {path} is not a regular file; give a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, root=None, what: str = "file", limit: int = TEXT_LIMIT) -> bytes:
    """The content of a regular file of at most ``limit`` bytes."""
    with open_regular(path, root, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(
            f"{what} {path} is larger than {limit >> 20} MiB, far more than such a file holds; "
            "it is not a valid checkpoint file"
        )
    return data


def read_text(path, root=None, what: str = "file", limit: int = TEXT_LIMIT) -> str:
    """A regular UTF-8 text file (see `read_bytes`)."""
    try:
        return read_bytes(path, root, what, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path, root=None, what: str | None = None, kind: type | None = dict, limit: int = TEXT_LIMIT):
    """A JSON file, checked to hold a ``kind`` (an object by default)."""
    what = what or Path(path).name
    try:
        value = json.loads(read_text(path, root, what, limit))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); download or write it again"
        ) from None
    except RecursionError:
        raise InputError(f"{what} {path} nests too deeply to be a valid file") from None
    if kind is not None and not isinstance(value, kind):
        expected = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise InputError(f"{what} {path} holds {type(value).__name__} where {expected} is expected")
    return value


def safetensors_header(path, root=None) -> dict:
    """The validated header of a safetensors file: ``{name: (dtype, shape, nbytes)}`` plus ``"__metadata__"``.

    Checks what a loader would otherwise crash or over-read on: the header length, its JSON, each
    tensor's dtype, shape and offsets (inside the file, in order, matching the dtype and shape), so
    that a corrupt or truncated file is one `InputError` naming it, before anything is allocated.
    """
    name = Path(path).name
    with open_regular(path, root, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"weights file {path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > HEADER_LIMIT or 8 + n > size:
            raise InputError(
                f"weights file {path} has a corrupt header (length {n} in a file of {size} bytes); download it again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"weights file {path} has a corrupt header (not JSON); download it again") from None
    if not isinstance(header, dict):
        raise InputError(f"weights file {path} has a corrupt header (not a JSON object); download it again")
    data = size - 8 - n
    out, spans = {}, []
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise InputError(f"weights file {path} has corrupt metadata; download it again")
    for key, t in header.items():
        bad = f"weights file {name}: tensor {key!r} has"
        if not isinstance(t, dict) or set(t) - {"dtype", "shape", "data_offsets"}:
            raise InputError(f"{bad} a corrupt entry; download the file again")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{bad} dtype {dtype!r}, which is not a safetensors dtype MLX reads")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise InputError(f"{bad} an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise InputError(
                f"{bad} offsets {offsets!r} outside the file's {data} data bytes: the file is "
                "truncated or corrupt; download it again"
            )
        count = 1
        for d in shape:
            count *= d
        nbytes = count * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(
                f"{bad} {offsets[1] - offsets[0]} bytes but dtype {dtype} and shape {shape} need "
                f"{nbytes}: the file is corrupt"
            )
        spans.append((offsets[0], offsets[1], key))
        out[key] = (dtype, tuple(shape), nbytes)
    spans.sort()
    for (_, a1, ka), (b0, _, kb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise InputError(f"weights file {name}: tensors {ka!r} and {kb!r} overlap: the file is corrupt")
    out["__metadata__"] = meta or {}
    return out
