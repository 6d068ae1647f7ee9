"""The built-in sources' calibration and held-out splits."""

import pytest

from gptqlab.calib import BUILTIN_SOURCES, builtin_texts
from gptqlab.errors import CalibrationError


@pytest.mark.parametrize("source", BUILTIN_SOURCES)
def test_splits_are_disjoint_and_non_empty(source):
    calibration = builtin_texts(source, "calibration")
    heldout = builtin_texts(source, "heldout")
    assert len(calibration) > 10_000
    assert len(heldout) > 1_000
    assert set(calibration) & set(heldout) == set()
    assert all(p.strip() for p in calibration + heldout)


def test_unknown_split_is_refused():
    with pytest.raises(CalibrationError, match="unknown split 'test'; choose 'calibration' or 'heldout'"):
        builtin_texts("reviews", "test")
