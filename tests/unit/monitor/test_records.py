"""Records survive the JSON trip from ranks to the controller, and bad input is refused."""

from __future__ import annotations

import json

import pytest

from hpt.monitor.records import (
    CollectiveRecord,
    Finding,
    FindingKind,
    SectionRecord,
    StepRecord,
    decode_line,
    encode_line,
    record_from_dict,
)

STEP = StepRecord(
    job_id="j",
    attempt=1,
    rank=2,
    node="n",
    step=7,
    start_s=1.0,
    end_s=1.5,
    data_wait_s=0.1,
    compute_s=0.3,
)
COLL = CollectiveRecord(
    job_id="j",
    attempt=1,
    rank=2,
    node="n",
    seq=3,
    op="all_reduce",
    nbytes=1024,
    enter_s=1.1,
    exit_s=None,
)
SECTION = SectionRecord(
    job_id="j", attempt=1, rank=2, node="n", step=7, name="forward", start_s=1.0, end_s=1.2
)
FINDING = Finding(
    kind=FindingKind.HANG,
    job_id="j",
    attempt=1,
    rank=2,
    node="n",
    message="rank 2 hung",
    detected_at_s=9.0,
    evidence={"silent_s": 12.5, "phase": "steady", "count": 3},
)


@pytest.mark.parametrize("record", [STEP, COLL, SECTION, FINDING])
def test_every_record_round_trips_through_a_json_line(record):
    line = encode_line(record)
    assert "\n" not in line
    assert decode_line(line) == record
    assert type(record).from_dict(json.loads(line)) == record


def test_finding_kind_travels_as_its_string_value():
    assert FINDING.to_dict()["kind"] == "hang"
    assert FindingKind.STRAGGLER_CLEARED.is_fault is False
    assert FindingKind.COLLECTIVE_MISSING.is_fault is True


def test_step_record_durations():
    assert STEP.step_s == pytest.approx(0.5)
    assert STEP.busy_s == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": -1}, "StepRecord.rank (-1) must be >= 0"),
        ({"rank": True}, "StepRecord.rank (True) must be an integer"),
        ({"step": "7"}, "StepRecord.step ('7') must be an integer"),
        ({"end_s": 0.5}, "StepRecord.end_s (0.5) must be >= start_s (1.0)"),
        ({"compute_s": -0.1}, "StepRecord.compute_s (-0.1) must be >= 0.0"),
        ({"job_id": ""}, "StepRecord.job_id ('') must not be empty"),
        ({"type": "collective"}, "StepRecord.type ('collective') must be 'step'"),
    ],
)
def test_invalid_step_fields_are_refused_naming_field_value_and_rule(change, message):
    with pytest.raises(ValueError) as err:
        StepRecord.from_dict({**STEP.to_dict(), **change})
    assert str(err.value) == message


def test_missing_field_is_refused():
    d = COLL.to_dict()
    del d["seq"]
    with pytest.raises(ValueError, match=r"CollectiveRecord.seq is missing"):
        record_from_dict(d)


def test_non_finite_numbers_are_refused():
    with pytest.raises(ValueError, match=r"enter_s \(nan\) must be a finite number"):
        decode_line(
            '{"type":"collective","job_id":"j","attempt":0,"rank":0,"node":"n",'
            '"seq":0,"op":"x","nbytes":0,"enter_s":NaN,"exit_s":null}'
        )
    bad = Finding(
        kind=FindingKind.HANG,
        job_id="j",
        attempt=0,
        rank=0,
        node="",
        message="",
        detected_at_s=0.0,
        evidence={"x": float("inf")},
    )
    with pytest.raises(ValueError):
        encode_line(bad)


def test_unknown_record_type_and_finding_kind_are_refused():
    with pytest.raises(ValueError, match=r"record.type \('bogus'\) must be one of"):
        record_from_dict({"type": "bogus"})
    with pytest.raises(ValueError, match=r"Finding.kind \('oops'\) must be one of straggler"):
        record_from_dict({**FINDING.to_dict(), "kind": "oops"})
    with pytest.raises(ValueError, match="not JSON"):
        decode_line("{")


def test_finding_evidence_must_be_flat_strings_and_numbers():
    with pytest.raises(ValueError, match=r"Finding.evidence\['x'\] \(\[1\]\)"):
        record_from_dict({**FINDING.to_dict(), "evidence": {"x": [1]}})
