"""The xAI SDK's first example, unchanged except for its import.

Run a server (``make serve``), then ``python assets/examples/sample_text.py``. The host comes
from $SAMPLER_API_HOST (default localhost:50051), the key from $XAI_API_KEY.
"""

import asyncio

import sampler_core as xai_sdk


async def main():
    client = xai_sdk.Client()

    prompt = "The answer to life and the universe and everything is of course"
    print(prompt, end="")
    async for token in client.sampler.sample(prompt, max_len=8):
        print(token.token_str, end="")
    print("")


asyncio.run(main())
