"""Sidebar text -> settings values. Pure functions; validation is SampleSettings' own."""

from __future__ import annotations

from typing import Any

from sampler_core.settings import PREFILL_MODES, InputToken, SampleSettings

#: The prefill choices the sidebar offers: the engine's default, then each mode by name.
PREFILL_CHOICES = ("", *PREFILL_MODES)
_PREFILL_LABELS = {"": "engine default", "float32": "float32 (exact arithmetic)",
                   "fixed16": "fixed16 (~1.4x faster, ~1e-3 off)",
                   "fast": "fast (~2x faster, not within 1e-3)"}


def prefill_label(mode: str) -> str:
    """How the sidebar names a prefill choice."""
    return _PREFILL_LABELS.get(mode, mode)


def unescape(text: str) -> str:
    r"""Turn the escapes people type in a one-line field (\n, \t, \\) into characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_lines(text: str) -> tuple[str, ...]:
    """One entry per line, escapes applied, empty lines dropped (spaces are kept)."""
    return tuple(unescape(line) for line in text.splitlines() if line != "")


def parse_tokens(text: str) -> tuple[InputToken, ...]:
    """One token per line: a plain number is a token id, anything else the token's text."""
    return tuple(int(e) if e.strip().isdigit() and e == e.strip() else e for e in parse_lines(text))


def build_settings(values: dict[str, Any]) -> SampleSettings:
    """SampleSettings from the sidebar's raw values; raises InvalidSettings with ``.field``."""
    return SampleSettings(
        max_len=values["max_len"], temperature=values["temperature"],
        nucleus_p=values["nucleus_p"], rng_seed=values["rng_seed"], top_k=values["top_k"],
        stop_tokens=parse_lines(values.get("stop_tokens", "")),
        stop_strings=parse_lines(values.get("stop_strings", "")),
        allowed_tokens=parse_tokens(values.get("allowed_tokens", "")),
        disallowed_tokens=parse_tokens(values.get("disallowed_tokens", "")),
        return_attention=values.get("return_attention", False),
        full_attention=values.get("full_attention", False),
        score_prompt=values.get("score_prompt", False),
        stop_at_eos=values.get("stop_at_eos", True), prefill=values.get("prefill", ""))
