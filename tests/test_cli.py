"""The sampler-core command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sampler_core.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_sample_prints_completion_and_table(engine) -> None:
    out = cli("sample", "The capital of France is", "--max-len", "4", "--temperature", "0",
              "--top-k", "3")
    assert out.returncode == 0, out.stderr
    assert "The capital of France is Paris" in out.stdout
    assert "top alternatives" in out.stdout and "finished: max_len" in out.stdout


def test_sample_json_and_tokenize_and_models(engine) -> None:
    out = cli("sample", "Hi", "--max-len", "3", "--json", "--seed", "4")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(data["tokens"]) <= 3 and data["finish_reason"] in {"max_len", "eos"}
    tok = cli("tokenize", "Hello world")
    assert "19556" in tok.stdout and "2 tokens" in tok.stdout
    models = cli("models")
    assert "smollm2-135m-instruct" in models.stdout


def test_bad_settings_exit_2_with_the_message(engine) -> None:
    out = cli("sample", "Hi", "--nucleus-p", "1.5")
    assert out.returncode == 2
    assert "nucleus_p must be in (0, 1], got 1.5" in out.stderr and "Traceback" not in out.stderr
    out = cli("sample", "Hi", "--prefill", "int8")
    assert out.returncode == 2
    assert "prefill must be one of float32, fixed16, fast" in out.stderr
    assert "'int8'" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_a_negative_prompt_cache_budget() -> None:
    out = cli("serve", "--prompt-cache-mb", "-3", "--port", "0")
    assert out.returncode == 2
    assert "--prompt-cache-mb must be a whole number of MB >= 0" in out.stderr and "-3" in out.stderr


def test_serve_hands_its_prompt_cache_budget_to_the_engines(monkeypatch) -> None:
    from sampler_core.cli import set_prompt_cache_env
    from sampler_core.engine.prompt_cache import BUDGET_ENV, budget_from_env

    monkeypatch.setenv(BUDGET_ENV, "7")
    assert set_prompt_cache_env(None) and budget_from_env() == 7 * 10**6  # left as it was
    assert set_prompt_cache_env(0) and budget_from_env() == 0
    assert not set_prompt_cache_env(-1) and budget_from_env() == 0
