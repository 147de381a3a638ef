"""grpokit.util: the shared checks name the culprit."""

import math

import pytest

from grpokit.util import check_bool, check_choice, check_int, check_keys, check_real, closest, nan_to_none


def test_checks_name_the_field():
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1 \(why\), got True$"):
        check_int("steps", True, low=1, why="why")
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0.0, got inf$"):
        check_real("lr", math.inf, low=0.0, strict=True)
    with pytest.raises(ValueError, match=r"^w must be a finite number, got nan$"):
        check_real("w", math.nan, low=float("-inf"))
    with pytest.raises(ValueError, match="^mode must be one of a, b; got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="^flag must be true or false, got 1$"):
        check_bool("flag", 1)
    check_int("n", 3, low=1), check_real("x", 0.0, low=0.0), check_choice("m", "a", "ab"), check_bool("f", False)


def test_unknown_keys_get_the_closest_name():
    assert closest("learnig_rate", ["learning_rate", "seed"]) == "learning_rate"
    assert closest("zzz", ["learning_rate"]) is None
    with pytest.raises(ValueError, match="^unknown config key 'betta'; did you mean 'beta'\\?$"):
        check_keys({"betta": 1}, ["beta", "seed"])


def test_nan_to_none():
    assert nan_to_none(float("nan")) is None and nan_to_none(2) == 2.0
