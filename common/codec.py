"""msgpack, the byte format wherever data leaves Ray (the rollout log, HTTP bodies).

numpy arrays travel as msgpack ext type 1: a msgpack header [dtype, shape] followed by the raw
little-endian bytes. Decoding is strict and bounded: a size limit on the whole payload, a
whitelist of dtypes, shape/size agreement, then pydantic validation. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

ARRAY_EXT = 1
DTYPES = {"bool", "uint8", "int32", "int64", "float16", "float32", "float64"}
MAX_BYTES = 256 * 2**20  # default bound on one decoded payload
MAX_DIMS = 8
#: The most items of one list or mapping in a message (a scoring request's prompts are one per
#: image). A byte of msgpack is an empty list, 56 bytes of Python, and each wrong item a validation
#: error: a body of [[]] * N cost gigabytes of the server's memory within --max-bytes.
MAX_ITEMS = 65_536
#: Validation errors a DecodeError shows (the first; their count is said).
SHOWN_ERRORS = 3

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """Malformed, oversized or wrongly typed bytes."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in DTYPES:
            raise TypeError(f"cannot encode arrays of dtype {obj.dtype}")
        arr = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        header = msgpack.packb([obj.dtype.name, list(obj.shape)])
        return msgpack.ExtType(ARRAY_EXT, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise DecodeError(f"unknown msgpack ext type {code}")
    unpacker = msgpack.Unpacker(max_buffer_size=len(data), strict_map_key=True)
    unpacker.feed(data)
    try:
        dtype, shape = unpacker.unpack()
    except Exception as e:  # noqa: BLE001 - any malformed header is a DecodeError
        raise DecodeError(f"bad array header: {e}") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DecodeError(f"array dtype {dtype!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DecodeError(f"bad array shape {shape!r}")
    body = data[unpacker.tell() :]
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected != len(body):
        raise DecodeError(f"array of dtype {dtype} and shape {shape} needs {expected} bytes, got {len(body)}")
    return np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype)


def pack(obj: Any) -> bytes:
    """Encode a pydantic model or plain data (dicts, lists, scalars, numpy arrays)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack_raw(data: bytes, max_bytes: int = MAX_BYTES) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    unpacker = msgpack.Unpacker(
        ext_hook=_ext_hook,
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
        max_array_len=MAX_ITEMS,
        max_map_len=MAX_ITEMS,
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise DecodeError(f"{len(data) - unpacker.tell()} trailing bytes after the message")
        return obj
    except msgpack.OutOfData:
        raise DecodeError("truncated msgpack message") from None
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for malformed input
        raise DecodeError(f"malformed msgpack: {type(e).__name__}: {e}") from None


def unpack(data: bytes, model: type[M], max_bytes: int = MAX_BYTES) -> M:
    """Decode and validate bytes into ``model``; DecodeError names what is wrong."""
    raw = unpack_raw(data, max_bytes)
    try:
        return model.model_validate(raw)
    except ValidationError as e:  # the first few: a list of a thousand wrong items is a thousand errors
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        said = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'the message'}: {x['msg']}" for x in errors[:SHOWN_ERRORS])
        more = f" (and {len(errors) - SHOWN_ERRORS} more)" if len(errors) > SHOWN_ERRORS else ""
        raise DecodeError(f"invalid {model.__name__}: {said}{more}") from None


# --- append-only record logs -----------------------------------------------------------------

#: Largest record the log writer writes and its reader reads (one bound for both sides).
MAX_RECORD = 16 * 2**20


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """A storage error within says which file it was (a file object's write does not): a run that
    stops on it says "cannot write <file>", not "storage failed"."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:  # one without an errno would print as "[Errno None]"
            e.filename = str(path)
        raise


def append_records(path: Path, records: Sequence[BaseModel]) -> None:
    """Append records to a msgpack stream file, flushed to disk. A record larger than
    ``MAX_RECORD`` is refused before anything is written, so every record written can be read."""
    blobs = [pack(r) for r in records]
    for blob in blobs:
        if len(blob) > MAX_RECORD:
            raise ValueError(f"a log record of {len(blob)} bytes exceeds the limit of {MAX_RECORD}")
    with naming(path), open(path, "ab") as f:
        for blob in blobs:
            f.write(blob)
        f.flush()


@dataclass
class LogScan:
    records: list  # the complete, valid records, in order
    good_bytes: int  # where the last complete record ends
    torn_bytes: int  # bytes of an incomplete last record after it (a crash mid-write)


def _records_with_ends(f: BinaryIO, source: Path | str, model: type[M]) -> Iterator[tuple[M, int]]:
    """(record, byte offset where it ends) for each complete record of the open log ``f``; a torn
    tail ends the iteration, damage anywhere else raises DecodeError naming its byte offset."""
    unpacker = msgpack.Unpacker(f, ext_hook=_ext_hook, raw=False, strict_map_key=True, max_buffer_size=MAX_RECORD)
    offset = 0
    while True:
        try:
            raw = unpacker.unpack()
        except msgpack.OutOfData:
            return
        except msgpack.BufferFull:
            raise DecodeError(f"{source}: record at byte {offset} is larger than {MAX_RECORD} bytes") from None
        except Exception as e:  # noqa: BLE001 - msgpack raises many types for damaged bytes
            raise DecodeError(f"{source}: damaged record at byte {offset}: {type(e).__name__}: {e}") from None
        try:
            record = model.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise DecodeError(
                f"{source}: damaged record at byte {offset}: not a {model.__name__}"
                f" ({'.'.join(map(str, first['loc'])) or 'record'}: {first['msg']})"
            ) from None
        offset = unpacker.tell()
        yield record, offset


def scan_records(path: Path | str, model: type[M]) -> LogScan:
    """Read a whole record log. An incomplete last record (a torn tail) is reported in
    ``torn_bytes``, not raised; damage anywhere else raises DecodeError naming its byte offset."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pairs = list(_records_with_ends(f, path, model))
    end = pairs[-1][1] if pairs else 0
    return LogScan([r for r, _ in pairs], end, size - end)


def read_records(source: Path | str, model: type[M]) -> Iterator[M]:
    """Iterate the records of a log written by ``append_records``, one at a time (constant
    memory). A torn last record (a crash mid-write) ends the iteration; damage anywhere else
    raises DecodeError naming the byte offset."""
    with open(source, "rb") as f:
        for record, _ in _records_with_ends(f, source, model):
            yield record
