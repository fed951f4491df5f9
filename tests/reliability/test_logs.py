"""The run's logs survive damage: read record by record, a torn tail is told apart from damage in
the middle (which names its offset), and every record the writer writes can be read back."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codec import (
    MAX_RECORD,
    DecodeError,
    append_records,
    pack,
    read_records,
    scan_records,
)
from common.messages import RolloutRecord
from common.prompts import MAX_PROMPT_CHARS
from learner.metrics import scan_jsonl

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rec(i: int, prompt: str = "class 1") -> RolloutRecord:
    return RolloutRecord(
        iteration=i,
        context=i,
        k=0,
        prompt=prompt,
        seed=i,
        version=i,
        tau=[0.5, 0.5],
        logp=-1.0,
        reward=0.25,
        rewards={"toy": 0.25},
        baseline=0.0,
        advantage=0.25,
    )


def _log(tmp_path, n: int = 5):
    path = tmp_path / "rollouts.msgpack"
    path.unlink(missing_ok=True)
    append_records(path, [_rec(i) for i in range(n)])
    return path


def test_the_largest_prompt_round_trips_and_oversized_records_are_refused_before_writing(tmp_path):
    path = tmp_path / "big.msgpack"
    append_records(path, [_rec(0, "é" * MAX_PROMPT_CHARS)] * 3)
    assert [r.prompt for r in read_records(path, RolloutRecord)] == ["é" * MAX_PROMPT_CHARS] * 3
    size = path.stat().st_size
    with pytest.raises(ValueError, match="exceeds the limit"):
        append_records(path, [_rec(1), _rec(2, "x" * (MAX_RECORD + 1))])
    assert path.stat().st_size == size, "nothing of a refused batch is written"


def test_torn_tail_is_reported_not_raised(tmp_path):
    path = _log(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole + pack(_rec(5))[:-3])
    scan = scan_records(path, RolloutRecord)
    assert [r.iteration for r in scan.records] == [0, 1, 2, 3, 4]
    assert scan.good_bytes == len(whole) and scan.torn_bytes == len(pack(_rec(5))) - 3
    assert [r.iteration for r in read_records(path, RolloutRecord)] == [0, 1, 2, 3, 4]


def test_damage_in_the_middle_names_its_offset(tmp_path):
    path = _log(tmp_path)
    data = bytearray(path.read_bytes())
    one = len(pack(_rec(0)))
    data[2 * one] = 0xC1  # a byte msgpack never uses, at the start of the third record
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=f"damaged record at byte {2 * one}"):
        scan_records(path, RolloutRecord)
    with pytest.raises(DecodeError, match=f"damaged record at byte {2 * one}"):
        list(read_records(path, RolloutRecord))


@FUZZ
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=16), st.booleans())
def test_any_damage_is_a_torn_tail_or_a_decode_error(tmp_path, at, junk, insert):
    """Property: damaged logs never crash the reader any other way, and it accounts for every
    byte. (A byte changed inside a value can still read as a valid record: the log has no
    per-record checksum; docs/reliability.md says so.)"""
    path = _log(tmp_path, 6)
    data = path.read_bytes()
    at = at % (len(data) + 1)
    bad = data[:at] + junk + (data[at:] if insert else data[at + len(junk) :])
    path.write_bytes(bad)
    try:
        scan = scan_records(path, RolloutRecord)
    except DecodeError as e:
        assert "at byte" in str(e)
        return
    assert all(isinstance(r, RolloutRecord) for r in scan.records)
    assert scan.good_bytes + scan.torn_bytes == len(bad)
    if at > len(data) // 2 and insert:  # damage late in the log leaves the records before it intact
        one = len(pack(_rec(0)))
        assert [r.iteration for r in scan.records[: at // one]] == list(range(at // one))


def test_metrics_torn_last_line_and_damage_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    rows, good, torn = scan_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2] and torn == len('{"step": 3, "a"')
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        scan_jsonl(path)
    path.write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a metrics row"):
        scan_jsonl(path)
