"""One prompt under a few seeds: each seed gives its own, reproducible completion.

``python assets/examples/compare_seeds.py`` against a running server ($SAMPLER_API_HOST).
Prints one line per seed: ``seed N: <completion>``.
"""

import asyncio

import sampler_core as xai_sdk


async def main():
    client = xai_sdk.Client()

    prompt = "Once upon a time, in a small village,"
    for seed in (1, 2, 3):
        text = ""
        async for token in client.sampler.sample(prompt, max_len=8, rng_seed=seed):
            text += token.token_str
        print(f"seed {seed}: {text!r}")


asyncio.run(main())
