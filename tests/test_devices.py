"""Device choice: auto-detection, forcing the CPU, and clear errors for what cannot be had."""

from __future__ import annotations

import pytest
import torch

from sampler_core.cli import main
from sampler_core.engine import get_engine
from sampler_core.engine.devices import DEVICE_ENV, choose_device
from sampler_core.errors import InvalidSettings
from sampler_core.inputs import to_parts
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token


def test_auto_takes_a_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device(None).type == expected
    assert choose_device("auto").type == expected
    assert choose_device(" AUTO ").type == expected


def test_cpu_can_be_forced_by_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert choose_device(None) == torch.device("cpu")


def test_bad_values_name_the_field_the_value_and_what_is_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidSettings, match=r"device must be auto, cpu, cuda or cuda:N, "
                                              r"got 'tpu'") as caught:
        choose_device("tpu")
    assert caught.value.field == "device"
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(InvalidSettings, match=rf"{DEVICE_ENV} must be auto, cpu, cuda or "
                                              r"cuda:N, got 'gpu0'"):
        choose_device(None)


def test_cuda_is_taken_when_present_and_refused_when_absent() -> None:
    if torch.cuda.is_available():
        assert choose_device("cuda").type == "cuda"
    else:
        with pytest.raises(InvalidSettings, match=r"device is 'cuda' but torch .* sees no CUDA "
                                                  r"device; use 'auto' or 'cpu'"):
            choose_device("cuda")


def test_engine_on_a_forced_cpu(engine) -> None:
    forced = get_engine("", device="cpu")
    assert forced.device.type == "cpu"
    if engine.device.type == "cpu":
        assert forced is engine  # one engine per model and device
    settings = SampleSettings(max_len=12, temperature=0.8, rng_seed=5, stop_at_eos=False)
    tokens = [t for t in forced.start(to_parts("A short test:"), settings) if isinstance(t, Token)]
    assert len(tokens) == 12 and all(0.0 < t.prob <= 1.0 for t in tokens)


def test_cli_refuses_a_device_it_cannot_have(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "hello", "--device", "tpu"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
