"""Vision-language engines on tiny randomly initialised models built here from configs (no
weight files): LLaVA and Idefics3 (SmolVLM's family) through the same local-folder loader a
user's checkpoint goes through. Structure only: image tokens counted and placed, their texts,
attention rows covering them, top-k and probabilities, bad images refused while the engine
keeps serving. The bundled vlm-1's answers are checked in test_vision_vlm1.py."""

from __future__ import annotations

import copy
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sampler_core.engine import get_engine
from sampler_core.errors import InvalidImage, InvalidInput
from sampler_core.inputs import ImagePart, TextPart, TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import RunSummary, Token, TokenType
from sampler_core.vision.tokens import parse_image_token


def png(colour: str | tuple[int, int, int], size: tuple[int, int] = (50, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiny_text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def tiny_llava(engine, tmp_path_factory) -> Any:
    """A 2-layer LLaVA with a 2-layer CLIP tower: 32x32 images, 8x8 patches -> 16 tokens."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)
    config = LlavaConfig(text_config=_tiny_text_config(tokenizer), vision_config=vision,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1).save_pretrained(folder)
    return get_engine(str(folder))


@pytest.fixture(scope="session")
def tiny_idefics3(engine, tmp_path_factory) -> Any:
    """A 2-layer Idefics3 (SmolVLM's architecture): 32x32 tiles, 4 tokens per tile."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig)

    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
        *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]]})
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8)
    config = Idefics3Config(text_config=_tiny_text_config(tokenizer).to_dict(),
                            vision_config=vision.to_dict(), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-idefics3")
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    Idefics3Processor(image_processor=Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
        do_image_splitting=True), tokenizer=tokenizer, image_seq_len=4).save_pretrained(folder)
    return get_engine(str(folder))


def run(engine: Any, parts: list, **settings: Any) -> tuple[Any, list[Token], RunSummary]:
    defaults = dict(max_len=3, temperature=0.0, top_k=3, return_attention=True)
    generation = engine.start(parts, SampleSettings(**{**defaults, **settings}))
    events = list(generation)
    return generation, [e for e in events if isinstance(e, Token)], events[-1]


def test_local_vision_folders_load_as_vision_engines(tiny_llava, tiny_idefics3) -> None:
    from sampler_core.engine.vlm import VisionLanguageEngine

    assert isinstance(tiny_llava, VisionLanguageEngine)
    assert isinstance(tiny_idefics3, VisionLanguageEngine)


def test_image_tokens_are_counted_and_placed(tiny_llava) -> None:
    before = tiny_llava.encode("Look:")
    after = tiny_llava.encode(" what is it?")
    generation, _, summary = run(tiny_llava, [TextPart("Look:"), ImagePart(png("red")),
                                              TextPart(" what is it?")])
    image_id = tiny_llava.image_token_id
    assert list(generation.prompt_ids) == before + [image_id] * 16 + after
    (span,) = generation.images
    assert (span.image, span.start, span.length, span.rows, span.cols) == (1, len(before), 16,
                                                                          4, 4)
    assert span.patches == tuple(range(len(before), len(before) + 16))
    assert (span.width, span.height) == (50, 40)
    assert summary.num_prompt_tokens == len(before) + 16 + len(after)


def test_parts_in_any_order_and_several_images(tiny_llava) -> None:
    generation, tokens, _ = run(tiny_llava, [ImagePart(png("red")), TextPart("and"),
                                             ImagePart(png("blue")), TextPart("?")],
                                score_prompt=True, max_len=1)
    first, second = generation.images
    assert (first.image, first.start) == (1, 0)
    assert (second.image, second.start) == (2, 16 + len(tiny_llava.encode("and")))
    prompt = [t for t in tokens if t.token_type == TokenType.USER]
    texts = [t.token_str for t in prompt]
    assert texts[0] == "<image 1: patch 1,1>" and texts[15] == "<image 1: patch 4,4>"
    assert texts[second.start + 6] == "<image 2: patch 2,3>"
    patches = [parse_image_token(t) for t in texts]
    assert sum(p is not None for p in patches) == 32
    assert [t.position for t in prompt] == list(range(len(generation.prompt_ids)))


def test_image_tokens_in_the_prompt_table_are_user_tokens_without_a_probability(
        tiny_llava) -> None:
    _, tokens, _ = run(tiny_llava, [TextPart("See"), ImagePart(png("green"))],
                       score_prompt=True, max_len=1)
    images = [t for t in tokens if parse_image_token(t.token_str)]
    assert len(images) == 16
    assert all(t.token_type == TokenType.USER and t.prob == 0.0 and t.raw_prob is None
               for t in images)
    assert all(len(t.top_k) == 3 for t in images)  # what the model expected there instead


def test_attention_rows_cover_the_image_tokens(tiny_llava) -> None:
    generation, tokens, _ = run(tiny_llava, [TextPart("Look:"), ImagePart(png("red")),
                                             TextPart(" what?")], full_attention=True)
    context = len(generation.prompt_ids)
    (span,) = generation.images
    for n, token in enumerate(tokens):
        assert token.token_type == TokenType.MODEL
        assert len(token.attn_weights) == context + n
        assert sum(token.attn_weights) == pytest.approx(1.0, abs=1e-4)
        over_image = np.asarray(token.attn_weights)[list(span.patches)]
        assert over_image.sum() > 0
        weights = token.attention.weights
        assert weights.shape == (2, 4, context + n)
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-4)


def test_generated_tokens_carry_top_k_and_probabilities(tiny_llava) -> None:
    _, tokens, _ = run(tiny_llava, [ImagePart(png("red")), TextPart("colour:")],
                       temperature=0.7, rng_seed=3, top_k=5)
    assert len(tokens) == 3
    for token in tokens:
        assert 0 < token.prob <= 1 and 0 < token.raw_prob <= 1 and token.rank >= 1
        assert len(token.top_k) == 5
        assert [t.rank for t in token.top_k] == [1, 2, 3, 4, 5]
        raw = [t.raw_prob for t in token.top_k]
        assert raw == sorted(raw, reverse=True)


def test_the_image_changes_what_the_model_predicts(tiny_llava) -> None:
    def first(colour: str) -> list[float]:
        _, tokens, _ = run(tiny_llava, [ImagePart(png(colour)), TextPart("is")], max_len=1)
        return [t.raw_prob for t in tokens[0].top_k]

    assert first("red") == first("red")
    assert first("red") != pytest.approx(first("blue"), rel=1e-6)


def test_text_only_prompts_still_work_on_a_vision_model(tiny_llava) -> None:
    generation, tokens, _ = run(tiny_llava, [TextPart("Hello there")])
    assert generation.images == () and len(tokens) == 3


def test_idefics3_tiles_and_global_view(tiny_idefics3) -> None:
    generation, tokens, _ = run(tiny_idefics3, [TextPart("Look:"), ImagePart(png("red")),
                                                TextPart(" what?")], score_prompt=True)
    (span,) = generation.images
    assert (span.rows, span.cols) == (2, 2)
    texts = [t.token_str for t in tokens if t.token_type == TokenType.USER]
    image_ids = [p for p, i in enumerate(generation.prompt_ids)
                 if i == tiny_idefics3.image_token_id]
    # 64x40 after resizing -> 2x2 tiles of 32 plus the global view, 4 tokens each.
    assert len(image_ids) == 5 * 4
    assert [texts[p] for p in span.patches] == ["<image 1: patch 1,1>", "<image 1: patch 1,2>",
                                                "<image 1: patch 2,1>", "<image 1: patch 2,2>"]
    assert texts[image_ids[0]] == "<image 1 tile 1: patch 1,1>"
    assert span.start < image_ids[0] and span.start + span.length > image_ids[-1]
    generated = [t for t in tokens if t.token_type == TokenType.MODEL]
    assert len(generated) == 3 and all(len(t.attn_weights) > image_ids[-1] for t in generated)


BAD_IMAGES = {
    "undecodable": (b"definitely not an image", r"cannot decode the image"),
    "truncated": (None, r"image is truncated or corrupt"),
    "too many pixels": (None, r"image is 6000x6000 = \d+ pixels; at most"),
}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` over almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                              2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b""))


def _bad(kind: str) -> bytes:
    if kind == "truncated":
        data = io.BytesIO()
        Image.effect_noise((64, 64), 40).convert("RGB").save(data, format="PNG")
        return data.getvalue()[:300]
    if kind == "too many pixels":
        return png_header_only(6000, 6000)
    return BAD_IMAGES[kind][0]


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_images_are_refused_and_the_engine_keeps_serving(tiny_llava, kind: str) -> None:
    with pytest.raises(InvalidImage, match=rf"^inputs\[2\]: {BAD_IMAGES[kind][1]}"):
        tiny_llava.start([TextPart("a"), ImagePart(png("red")), ImagePart(_bad(kind))],
                         SampleSettings(max_len=2))
    _, tokens, _ = run(tiny_llava, [TextPart("a"), ImagePart(png("red"))])
    assert len(tokens) == 3


def test_the_image_placeholder_id_cannot_be_sent_as_a_token(tiny_llava) -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: token id \d+ is .* image placeholder"):
        tiny_llava.start([TokenIdsPart((5, tiny_llava.image_token_id))], SampleSettings())


def test_out_of_vocabulary_ids_name_their_position(tiny_llava) -> None:
    with pytest.raises(InvalidInput, match=r"^inputs\[1\]: token id 999999 is outside"):
        tiny_llava.start([ImagePart(png("red")), TokenIdsPart((5, 999999))], SampleSettings())


def test_text_models_still_refuse_images(engine) -> None:
    with pytest.raises(InvalidInput, match=r"takes text only; send images"):
        engine.start([TextPart("a"), ImagePart(png("red"))], SampleSettings())


def test_a_folder_that_is_not_a_model_is_unknown(tmp_path: Path) -> None:
    from sampler_core.errors import UnknownModel

    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(UnknownModel, match="cannot load a vision-language model"):
        get_engine(str(tmp_path))
