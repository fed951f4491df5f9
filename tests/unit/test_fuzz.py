"""Bad input never crashes, hangs or allocates without bound: fuzzing the msgpack decoder and the
config loader with malformed, truncated, oversized and wrongly typed input."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codec import DecodeError, pack, unpack, unpack_raw
from common.config import ConfigError, load_config
from common.messages import RolloutRecord

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _record_bytes() -> bytes:
    return pack(
        RolloutRecord(
            iteration=1,
            context=2,
            k=0,
            prompt="the digit 3",
            seed=5,
            version=1,
            tau=[0.2, 0.3, 0.5],
            logp=0.1,
            reward=0.5,
            rewards={"digits": 0.5},
            baseline=0.4,
            advantage=0.1,
        )
    )


@FAST
@given(values)
def test_wrongly_typed_messages_are_decode_errors(obj):
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    with pytest.raises(DecodeError):
        unpack(data, RolloutRecord)


@FAST
@given(st.integers(0, 200), st.binary(max_size=8))
def test_truncated_or_corrupted_records(cut, junk):
    data = _record_bytes()
    cut = min(cut, len(data) - 1)
    with pytest.raises(DecodeError):
        unpack(data[:cut], RolloutRecord)
    with contextlib.suppress(DecodeError):
        unpack(data[:cut] + junk + data[cut + len(junk) :], RolloutRecord)


@FAST
@given(
    st.sampled_from(["float32", "uint8", "int64", "object", "V8", "<f4"]),
    st.lists(st.integers(-3, 2**40), max_size=10),
    st.binary(max_size=64),
)
def test_array_headers_never_allocate_without_bound(dtype, shape, body):
    """A header may claim any shape: the bytes must match it exactly, nothing is allocated first."""
    ext = msgpack.ExtType(1, msgpack.packb([dtype, shape]) + body)
    try:
        arr = unpack_raw(msgpack.packb({"a": ext}))["a"]
    except DecodeError:
        return
    assert arr.nbytes == len(body)


def test_oversized_payloads_are_refused_before_decoding():
    big = pack({"a": np.zeros(1000, dtype=np.float64)})
    with pytest.raises(DecodeError, match="exceeds"):
        unpack_raw(big, max_bytes=1000)
    # a msgpack header announcing a 4 GiB string in a 10-byte message
    with pytest.raises(DecodeError):
        unpack_raw(b"\xdb\xff\xff\xff\xff" + b"x" * 5)


sections = ["experiment", "sampler", "policy", "rollout", "rewards", "learner", "ray", "bogus"]


@FAST
@given(st.dictionaries(st.sampled_from(sections), values, max_size=3))
def test_config_loader_gives_a_config_or_a_config_error(data):
    try:
        load_config([], **data)
    except ConfigError as e:
        assert str(e).startswith(("invalid config", "invalid command line"))


@FAST
@given(
    st.sampled_from(["--rollout.k_schedule", "--rewards", "--rollout", "--policy.widths", "--ray.init_kwargs"]),
    st.sampled_from(["[", "{", ""]),
    st.text(max_size=60),
)
def test_any_list_or_mapping_flag_gives_a_config_or_one_line(flag, opening, text):
    """A flag's list or mapping is read as YAML (or JSON): whatever follows the bracket is a
    config, or a ConfigError of one line, never PyYAML's or pydantic-settings' own exception."""
    try:
        load_config([f"{flag}={opening}{text}"])
    except ConfigError as e:
        message = str(e)
        assert message.startswith(("invalid config", "invalid command line"))
        if message.startswith("invalid command line"):
            assert "\n" not in message


@FAST
@given(st.text(max_size=200))
def test_arbitrary_yaml_files(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text)
    with contextlib.suppress(ConfigError):
        load_config(["--config", str(p)])


@FAST
@given(st.lists(st.text(alphabet='-.=abcdefgikmnoprstuvwxyz0123456789[]{}":,', max_size=30), max_size=4))
def test_arbitrary_command_lines(argv):
    try:
        load_config(argv)
    except ConfigError:
        pass
    except SystemExit as e:  # argparse: unknown flag or bad value, exit status 2 with a usage line
        assert e.code == 2


def test_yaml_with_non_string_sections(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="section names must be strings"):
        load_config(["--config", str(p)])
