"""SampleSettings: normalisation and every validation message."""

from __future__ import annotations

import pytest

from sampler_core.errors import InvalidSettings
from sampler_core.settings import SampleSettings


def test_defaults_match_the_sdk() -> None:
    s = SampleSettings()
    assert (s.max_len, s.temperature, s.nucleus_p, s.top_k) == (256, 0.7, 0.95, 5)
    assert not s.return_attention and not s.score_prompt and s.stop_at_eos


def test_normalises_lists_and_numbers() -> None:
    s = SampleSettings(stop_tokens=["a", "b"], allowed_tokens=[1, "x"], temperature=1,
                       max_len=4.0)
    assert s.stop_tokens == ("a", "b") and s.allowed_tokens == (1, "x")
    assert isinstance(s.temperature, float) and s.max_len == 4
    assert SampleSettings(stop_strings="END").stop_strings == ("END",)


def test_prefill_is_normalised() -> None:
    assert SampleSettings().prefill == ""
    assert SampleSettings(prefill=" Fixed16 ").prefill == "fixed16"


def test_full_attention_implies_return_attention() -> None:
    assert SampleSettings(full_attention=True).return_attention


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_len": -1}, r"max_len must be in \[0, 32768\], got -1"),
        ({"max_len": 10**9}, r"max_len must be in \[0, 32768\], got 1000000000"),
        ({"max_len": "5"}, r"max_len must be an int in \[0, 32768\], got '5'"),
        ({"max_len": True}, r"max_len must be an int in \[0, 32768\], got True"),
        ({"temperature": -0.5}, r"temperature must be in \[0, 100\] \(0 means greedy\), got -0.5"),
        ({"temperature": float("nan")}, r"temperature must be a number in \[0, 100\], got nan"),
        ({"nucleus_p": 1.5}, r"nucleus_p must be in \(0, 1\], got 1.5"),
        ({"nucleus_p": 0}, r"nucleus_p must be in \(0, 1\], got 0.0"),
        ({"rng_seed": -3}, r"rng_seed must be in \[0, 2\*\*64-1\], got -3"),
        ({"rng_seed": 2**64}, r"rng_seed must be in \[0, 2\*\*64-1\], got 18446744073709551616"),
        ({"top_k": 101}, r"top_k must be in \[0, 100\], got 101"),
        ({"stop_tokens": [""]}, r"stop_tokens must be a list of non-empty strings, got ''"),
        ({"stop_strings": [3]}, r"stop_strings must be a list of non-empty strings, got 3"),
        ({"allowed_tokens": [-1]}, r"allowed_tokens must be a list of token ids \(int >= 0\)"),
        ({"disallowed_tokens": [1.5]}, r"disallowed_tokens must be a list of token ids"),
        ({"allowed_tokens": [1], "disallowed_tokens": [2]},
         r"allowed_tokens and disallowed_tokens cannot both be set, got 1 allowed and 1 disallowed"),
        ({"return_attention": "yes"}, r"return_attention must be a bool, got 'yes'"),
        ({"stop_tokens": ["x"] * 5000}, r"stop_tokens must be at most 4096 entries, got '5000 entries'"),
        ({"prefill": "int8"}, r"prefill must be one of float32, fixed16, fast, or empty for the "
                              r"engine's default, got 'int8'"),
        ({"prefill": 16}, r"prefill must be a string: one of float32, fixed16, fast, or empty, "
                          r"got 16"),
    ],
)
def test_validation_messages_name_field_range_and_value(changes: dict, message: str) -> None:
    with pytest.raises(InvalidSettings, match=message) as info:
        SampleSettings(**changes)
    assert info.value.field == next(iter(changes))


def test_replace_validates_and_rejects_unknown_fields() -> None:
    s = SampleSettings().replace(max_len=3)
    assert s.max_len == 3
    with pytest.raises(InvalidSettings, match=r"nucleus_p must be in \(0, 1\], got 2.0"):
        s.replace(nucleus_p=2.0)
    with pytest.raises(InvalidSettings, match=r"unknown setting 'top_p'"):
        s.replace(top_p=0.5)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SampleSettings().max_len = 3  # type: ignore[misc]
