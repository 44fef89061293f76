"""SampleSettings: every knob of one sampling run, normalised then validated.

The first eight fields are the wire protocol's ``SampleSettings``; the rest are our extensions.
Validation here checks what can be checked without a model (ranges, types, exclusivity);
the engine checks what needs one (token ids within the vocabulary, the context window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Union

from sampler_core.errors import InvalidSettings

#: A token named by its vocabulary id or by its text.
InputToken = Union[int, str]

MAX_LEN_LIMIT = 32_768
TEMPERATURE_LIMIT = 100.0
TOP_K_LIMIT = 100
MAX_LIST_ENTRIES = 4096
SEED_LIMIT = 2**64 - 1
#: How a long prompt's forward may compute on the packed CPU path: exact float32, or faster
#: and inexact (16- or 8-bit fixed-point activations; see README "Speed").
PREFILL_MODES = ("float32", "fixed16", "fast")


def _fail(name: str, allowed: str, value: Any) -> InvalidSettings:
    return InvalidSettings(f"{name} must be {allowed}, got {value!r}", field=name, value=value)


def _as_int(name: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _fail(name, allowed, value)
    return value


def _as_float(name: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, allowed, value)
    value = float(value)
    if not math.isfinite(value):
        raise _fail(name, allowed, value)
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def _as_strings(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    items = tuple(value)
    if len(items) > MAX_LIST_ENTRIES:
        raise _fail(name, f"at most {MAX_LIST_ENTRIES} entries", f"{len(items)} entries")
    for item in items:
        if not isinstance(item, str) or item == "":
            raise _fail(name, "a list of non-empty strings", item)
    return items


def _as_input_tokens(name: str, value: Iterable[Any] | None) -> tuple[InputToken, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        value = (value,)
    items = tuple(value)
    if len(items) > MAX_LIST_ENTRIES:
        raise _fail(name, f"at most {MAX_LIST_ENTRIES} entries", f"{len(items)} entries")
    for item in items:
        ok_int = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        ok_str = isinstance(item, str) and item != ""
        if not (ok_int or ok_str):
            raise _fail(name, "a list of token ids (int >= 0) or non-empty token strings", item)
    return items


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: the wire protocol's settings plus our extensions.

    - ``max_len``: tokens to generate, 0..32768 (0 only makes sense with ``score_prompt``).
    - ``temperature``: 0 means greedy (argmax); otherwise logits are divided by it.
    - ``nucleus_p``: keep the smallest set of tokens whose probability reaches it, in (0, 1].
    - ``stop_tokens``: strings that each name one vocabulary token; sampling that token ends
      the run and it is not included. A string that is not one token is reported in the
      run's notes and otherwise ignored.
    - ``stop_strings``: the run ends once the generated text contains one; the token that
      completed it is included.
    - ``allowed_tokens`` / ``disallowed_tokens``: ids or strings; at most one of the two.
    - ``rng_seed``: the sampling generator's seed, 0..2**64-1.
    - ``top_k``: how many alternatives each token carries, 0..100.
    - ``return_attention``: one weight per context token for each generated token, the mean
      over all heads of all layers.
    - ``full_attention``: also keep per-layer, per-head rows (implies return_attention).
    - ``score_prompt``: also return the prompt's tokens with teacher-forced probabilities.
    - ``stop_at_eos``: end the run when the model emits its end-of-sequence token.
    - ``prefill``: how the prompt's forward computes (prompts over 32 tokens, packed weights on
      the CPU): ``float32`` (exact arithmetic), ``fixed16`` (16-bit fixed-point activations:
      faster, probabilities ~1e-3 off float32's) or ``fast`` (faster still, ~0.1 off); the
      run's notes say when it was not float32. Empty for the engine's default (float32,
      unless ``$PROMPT_IDE_PREFILL`` names another).
    """

    max_len: int = 256
    temperature: float = 0.7
    nucleus_p: float = 0.95
    stop_tokens: tuple[str, ...] = ()
    rng_seed: int = 0
    allowed_tokens: tuple[InputToken, ...] = ()
    stop_strings: tuple[str, ...] = ()
    disallowed_tokens: tuple[InputToken, ...] = ()
    top_k: int = 5
    return_attention: bool = False
    full_attention: bool = False
    score_prompt: bool = False
    stop_at_eos: bool = True
    prefill: str = ""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        # Normalise: lists to tuples, ints to floats where the field is a float.
        set_(self, "max_len", _as_int("max_len", self.max_len, f"an int in [0, {MAX_LEN_LIMIT}]"))
        set_(self, "temperature", _as_float("temperature", self.temperature,
                                            f"a number in [0, {TEMPERATURE_LIMIT:g}]"))
        set_(self, "nucleus_p", _as_float("nucleus_p", self.nucleus_p, "a number in (0, 1]"))
        set_(self, "rng_seed", _as_int("rng_seed", self.rng_seed, f"an int in [0, 2**64-1]"))
        set_(self, "top_k", _as_int("top_k", self.top_k, f"an int in [0, {TOP_K_LIMIT}]"))
        set_(self, "stop_tokens", _as_strings("stop_tokens", self.stop_tokens))
        set_(self, "stop_strings", _as_strings("stop_strings", self.stop_strings))
        set_(self, "allowed_tokens", _as_input_tokens("allowed_tokens", self.allowed_tokens))
        set_(self, "disallowed_tokens", _as_input_tokens("disallowed_tokens", self.disallowed_tokens))
        for name in ("return_attention", "full_attention", "score_prompt", "stop_at_eos"):
            set_(self, name, _as_bool(name, getattr(self, name)))
        if self.full_attention:
            set_(self, "return_attention", True)
        if not isinstance(self.prefill, str):
            raise _fail("prefill", f"a string: one of {', '.join(PREFILL_MODES)}, or empty",
                        self.prefill)
        set_(self, "prefill", self.prefill.strip().lower())
        # Validate ranges.
        if not 0 <= self.max_len <= MAX_LEN_LIMIT:
            raise _fail("max_len", f"in [0, {MAX_LEN_LIMIT}]", self.max_len)
        if not 0.0 <= self.temperature <= TEMPERATURE_LIMIT:
            raise _fail("temperature", f"in [0, {TEMPERATURE_LIMIT:g}] (0 means greedy)", self.temperature)
        if not 0.0 < self.nucleus_p <= 1.0:
            raise _fail("nucleus_p", "in (0, 1]", self.nucleus_p)
        if not 0 <= self.rng_seed <= SEED_LIMIT:
            raise _fail("rng_seed", "in [0, 2**64-1]", self.rng_seed)
        if not 0 <= self.top_k <= TOP_K_LIMIT:
            raise _fail("top_k", f"in [0, {TOP_K_LIMIT}]", self.top_k)
        if self.prefill not in ("", *PREFILL_MODES):
            raise _fail("prefill", f"one of {', '.join(PREFILL_MODES)}, or empty for the "
                        "engine's default", self.prefill)
        if self.allowed_tokens and self.disallowed_tokens:
            raise InvalidSettings(
                "allowed_tokens and disallowed_tokens cannot both be set, got "
                f"{len(self.allowed_tokens)} allowed and {len(self.disallowed_tokens)} disallowed",
                field="allowed_tokens",
                value=self.allowed_tokens,
            )

    @property
    def greedy(self) -> bool:
        """True when the run picks the argmax at every step."""
        return self.temperature == 0.0

    def replace(self, **changes: Any) -> "SampleSettings":
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidSettings(f"unknown setting {name!r}; known: {', '.join(values)}",
                                  field=name, value=changes[name])
        values.update(changes)
        return SampleSettings(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}
