"""The run engine's refactors keep the numbers: seeded runs reproduce tests/data/golden_training.json."""

from __future__ import annotations

import json

import pytest

from tests.golden_training import (
    CASES,
    GOLDEN_FILE,
    golden_records,
    loose_mismatches,
    machine,
    matching_record,
    run_case,
)

GOLDEN = json.loads(GOLDEN_FILE.read_text())
#: This machine type's record (bit for bit), or None: the loose check against the first record.
SAME_MACHINE = matching_record(GOLDEN, machine())


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_runs_reproduce_the_golden_numbers(tmp_path, name):
    got = run_case(name, tmp_path / name)
    if SAME_MACHINE is not None:  # bit for bit (as float32, the precision TensorBoard stores)
        expected = SAME_MACHINE["cases"][name]
        assert sorted(got["stats"]) == sorted(expected["stats"]), "a logged statistic appeared or vanished"
        for tag, values in expected["stats"].items():
            assert got["stats"][tag] == values, tag
        assert got["weights_sha256"] == expected["weights_sha256"]
    else:  # other kernels round differently; the run must still be the same computation
        assert loose_mismatches(got["stats"], golden_records(GOLDEN)[0]["cases"][name]["stats"]) == []


def test_the_most_specific_matching_record_is_the_one_checked():
    first = {"machine": {"torch": "2.14.1", "machine": "x86_64"}, "cases": {"a": 1}}
    amx = {
        "machine": {"torch": "2.14.1", "machine": "x86_64", "cpu": "model 167: amx_tile"},
        "cases": {"a": 2},
    }
    golden = {**first, "other_machines": [amx]}
    assert (
        matching_record(golden, {"torch": "2.14.1", "machine": "x86_64", "cpu": "model 167: amx_tile"}) == amx
    )
    assert (
        matching_record(golden, {"torch": "2.14.1", "machine": "x86_64", "cpu": "model 143: avx512f"})
        == first
    )
    assert (
        matching_record(golden, {"torch": "2.15.0", "machine": "x86_64", "cpu": "model 167: amx_tile"})
        is None
    )
    assert loose_mismatches({"x": [1.0, 2.0]}, {"x": [1.0, 2.001]}) == []
    assert loose_mismatches({"x": [1.0, 2.5]}, {"x": [1.0, 2.0]}) == ["x: 2.5 against 2.0"]
    assert loose_mismatches({"y": [1.0]}, {"x": [1.0]}) != []
    assert loose_mismatches({"x": []}, {"x": [1.0]}) == ["x: 0 values against 1"]
