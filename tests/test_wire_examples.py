"""The SDK-style scripts in assets/examples/ run unchanged against a live server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sampler_core import Client, LocalClient
from conftest import need
from wire_fixtures import ROOT, wire_server  # noqa: F401

EXAMPLES = ROOT / "assets" / "examples"


def _run(script: str, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SAMPLER_API_HOST=host, XAI_API_KEY="unused-without-keys")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _count(host: str) -> int:
    async def main() -> int:
        client = Client(api_host=host)
        try:
            return len(await client.list_transactions())
        finally:
            await client.close()

    return asyncio.run(main())


def test_sample_text_example(wire_server) -> None:
    before = _count(wire_server.host)
    result = _run("sample_text.py", wire_server.host)
    assert result.returncode == 0, result.stderr
    prompt = "The answer to life and the universe and everything is of course"
    assert result.stdout.startswith(prompt) and len(result.stdout.strip()) > len(prompt)
    assert _count(wire_server.host) == before + 1  # it really went through the server


def test_compare_seeds_example_matches_in_process_runs(wire_server) -> None:
    result = _run("compare_seeds.py", wire_server.host)
    assert result.returncode == 0, result.stderr

    async def expected() -> list[str]:
        local = LocalClient()
        try:
            lines = []
            for seed in (1, 2, 3):
                text = "".join([t.token_str async for t in local.sampler.sample(
                    "Once upon a time, in a small village,", max_len=8, rng_seed=seed)])
                lines.append(f"seed {seed}: {text!r}")
            return lines
        finally:
            await local.close()

    assert result.stdout.splitlines() == asyncio.run(expected())


def test_multimodal_example_when_a_vision_model_exists(wire_server, tmp_path: Path) -> None:
    from sampler_core.engine import model_names

    if "vlm-1" not in wire_server.service.model_names() and "vlm-1" not in model_names():
        pytest.skip("no vision model (vlm-1) is registered yet")  # another issue builds it
    from PIL import Image

    image = tmp_path / "red.jpg"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(image)
    result = _run("sample_multimodal.py", wire_server.host, str(image))
    if "UnknownModel" in result.stderr and "missing" in result.stderr:
        need(False, f"vlm-1 is registered but cannot load: {result.stderr.splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
