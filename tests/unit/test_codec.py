"""msgpack codec: round trips, strict decoding, the rollout log and its reader."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec import DecodeError, append_records, pack, read_records, unpack, unpack_raw
from common.messages import RolloutRecord


def _record(i=0) -> RolloutRecord:
    return RolloutRecord(
        iteration=i,
        context=3,
        k=1,
        prompt="class 2",
        seed=42,
        version=i,
        tau=[0.1, 0.2, 0.7],
        logp=1.5,
        reward=-0.25,
        rewards={"toy": -0.25},
        baseline=0.1,
        advantage=-0.35,
    )


def test_model_round_trip():
    r = _record()
    assert unpack(pack(r), RolloutRecord) == r


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64", "bool"])
def test_array_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    b = unpack_raw(pack({"a": a}))["a"]
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    assert b.flags.writeable


def test_rejects_bad_arrays():
    bad_dtype = msgpack.ExtType(1, msgpack.packb(["object", [2]]) + b"\0" * 16)
    with pytest.raises(DecodeError, match="dtype"):
        unpack_raw(msgpack.packb({"a": bad_dtype}))
    short = msgpack.ExtType(1, msgpack.packb(["float32", [1000]]) + b"\0" * 8)
    with pytest.raises(DecodeError, match="needs 4000 bytes"):
        unpack_raw(msgpack.packb({"a": short}))
    with pytest.raises(DecodeError, match="shape"):
        unpack_raw(msgpack.packb(msgpack.ExtType(1, msgpack.packb(["uint8", [-1]]))))
    with pytest.raises(DecodeError, match="ext type"):
        unpack_raw(msgpack.packb(msgpack.ExtType(9, b"xx")))


def test_rejects_oversized_and_wrong_types():
    with pytest.raises(DecodeError, match="exceeds"):
        unpack_raw(b"\x00" * 100, max_bytes=10)
    with pytest.raises(DecodeError, match="invalid RolloutRecord"):
        unpack(pack({"iteration": "x"}), RolloutRecord)
    with pytest.raises(DecodeError):
        unpack("not bytes", RolloutRecord)  # type: ignore[arg-type]


def test_a_small_body_cannot_cost_gigabytes_to_decode():
    """A byte of msgpack is an empty list (56 bytes of Python) or a wrong item (a validation error
    of its own, all of them in the message): a 1.5 MB body of 1.5M items took the HTTP reward
    server from 53 MB to 1 GB, and 4 MB made a 719 MB error string."""
    from rewards.http import ScoreRequest

    with pytest.raises(DecodeError, match=r"1500000 exceeds max_array_len\(65536\)"):
        unpack(msgpack.packb({"images": None, "prompts": [[]] * 1_500_000}), ScoreRequest)
    with pytest.raises(DecodeError, match=r"exceeds max_map_len"):
        unpack_raw(msgpack.packb({str(i): 0 for i in range(70_000)}))
    with pytest.raises(DecodeError) as e:
        unpack(msgpack.packb({"images": None, "prompts": [0] * 60_000}), ScoreRequest)
    assert str(e.value) == (
        "invalid ScoreRequest: images: Input should be an instance of ndarray; prompts.0: Input should be a valid"
        " string; prompts.1: Input should be a valid string (and 59998 more)"
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_crash(data):
    with contextlib.suppress(DecodeError):
        unpack(data, RolloutRecord)


def test_rollout_log_append_and_read(tmp_path):
    path = tmp_path / "rollouts.msgpack"
    append_records(path, [_record(0), _record(1)])
    append_records(path, [_record(2)])
    got = list(read_records(path, RolloutRecord))
    assert [r.iteration for r in got] == [0, 1, 2]
    # a crash mid-write leaves a truncated last record: the complete ones still read
    with open(path, "ab") as f:
        f.write(pack(_record(3))[:10])
    assert [r.iteration for r in read_records(path, RolloutRecord)] == [0, 1, 2]
