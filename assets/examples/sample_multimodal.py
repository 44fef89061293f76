"""The xAI SDK's multimodal example, unchanged except for its import.

Needs a server with a vision model (``vlm-1`` in ListModels). Usage:
``python assets/examples/sample_multimodal.py IMAGE_FILE``.
"""

import asyncio
import base64
import sys

import sampler_core as xai_sdk


async def main():
    client = xai_sdk.Client()

    with open(sys.argv[1], "rb") as f:
        image = base64.b64encode(f.read()).decode("utf-8")
    image = f"data:image/jpeg;base64,{image}"

    prompt = "Human: What is in this image?<image>\n\nAssistant:"
    async for token in client.sampler.sample(
        prompt="",
        inputs=(prompt, image),
        max_len=16,
        model_name="vlm-1",
    ):
        print(token.token_str, end="")
    print("")


asyncio.run(main())
