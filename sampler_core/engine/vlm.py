"""Vision-language engines: images become tokens of the context.

The step loop is :class:`CausalLMEngine`'s; this module only changes how a prompt becomes a
context. Each image part is decoded (``images.py``), prepared for the model (resized, patch
grid) and laid into the context as a run of image tokens, USER tokens whose text reads
``<image 1: patch 3,4>``. The prefill then feeds the model the image as well:

- ``vlm-1`` (the bundled model): the frozen SmolLM2-135M-Instruct plus a small vision tower;
  the tower's 4x4 patch embeddings replace the image tokens' embeddings (``inputs_embeds``).
- Local SmolVLM / Idefics3 and LLaVA folders, through transformers: the model's own processor
  expands each image into its image tokens, and the model gets ``pixel_values`` with the ids.

After the prefill, decoding feeds token ids as usual: the images live on in the KV cache.
Attention rows cover image tokens like any others, so a view can draw a generated token's
attention over the image's patch grid (``Generation.images`` gives the grid's positions).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from PIL import Image

from sampler_core.engine.causal_lm import CausalLMEngine, CausalLMGeneration, Plan
from sampler_core.engine.images import decode_image
from sampler_core.engine.models import LoadedModel, Progress, finish_model
from sampler_core.engine.vision_tower import VisionTower, load_tower, to_pixels
from sampler_core.errors import InvalidInput, UnknownModel
from sampler_core.inputs import ImagePart, PromptPart, TextPart, TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token
from sampler_core.vision import VLM1_DOMAIN, VLM1_NAME
from sampler_core.vision.tokens import ImageSpan, image_token_text

VLM1_FOLDER = Path(__file__).resolve().parents[1] / "data" / "vlm-1"


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the prefill: its token ids and what the model needs besides."""

    ids: tuple[int, ...]
    labels: dict[int, str]  # offset within ``ids`` -> readable token text
    patches: tuple[int, ...]  # offsets of the overlay grid's tokens, row-major
    rows: int
    cols: int
    width: int
    height: int
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class VisionContext:
    """A plan's images: where they sit in the context and their prepared tensors."""

    spans: tuple[ImageSpan, ...]
    images: tuple[PreparedImage, ...]
    labels: dict[int, str]  # context position -> image token text


class VisionAdapter(Protocol):
    """What a vision-language model family supplies to the engine."""

    image_token_id: int

    def prepare(self, image: Image.Image, number: int) -> PreparedImage: ...

    def prefill_inputs(self, ids: Sequence[int], context: VisionContext,
                       model: Any) -> dict[str, torch.Tensor]: ...


def _grid_labels(number: int, rows: int, cols: int, prefix: str = "") -> list[str]:
    return [image_token_text(number, r + 1, c + 1) if not prefix else
            f"<image {number} {prefix}: patch {r + 1},{c + 1}>"
            for r in range(rows) for c in range(cols)]


class TowerAdapter:
    """``vlm-1``: a VisionTower whose patch embeddings replace the image tokens' embeddings."""

    def __init__(self, tower: VisionTower, image_token_id: int) -> None:
        self.tower = tower
        self.image_token_id = image_token_id

    def prepare(self, image: Image.Image, number: int) -> PreparedImage:
        grid = self.tower.config.grid
        n = grid * grid
        pixels = to_pixels(image, self.tower.config.image_size)
        return PreparedImage(ids=(self.image_token_id,) * n,
                             labels=dict(enumerate(_grid_labels(number, grid, grid))),
                             patches=tuple(range(n)), rows=grid, cols=grid, width=image.width,
                             height=image.height, tensors={"pixels": pixels})

    @torch.inference_mode()
    def prefill_inputs(self, ids: Sequence[int], context: VisionContext,
                       model: Any) -> dict[str, torch.Tensor]:
        device = model.get_input_embeddings().weight.device
        embeds = model.get_input_embeddings()(torch.tensor([list(ids)], device=device)).clone()
        pixels = torch.stack([image.tensors["pixels"] for image in context.images]).to(device)
        patches = self.tower(pixels).to(embeds.dtype)
        for n, span in enumerate(context.spans):
            embeds[0, span.start: span.start + span.length] = patches[n]
        return {"inputs_embeds": embeds}


class ProcessorAdapter:
    """A transformers vision-language model (Idefics3 / SmolVLM, LLaVA) and its processor.

    The processor expands one ``<image>`` into the model's image tokens (and framing tokens)
    and makes ``pixel_values``; the model splices the image features in itself.
    """

    def __init__(self, processor: Any, model: Any) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        token = getattr(processor, "image_token", None) or "<image>"
        self.image_token = str(token)
        self.image_token_id = int(getattr(processor, "image_token_id", None) or
                                  tokenizer.convert_tokens_to_ids(self.image_token))
        #: Image tokens per tile (Idefics3 cuts big images into tiles plus a global view).
        self.tile_len: int | None = getattr(processor, "image_seq_len", None)

    def prepare(self, image: Image.Image, number: int) -> PreparedImage:
        images: Any = [[image]] if self.tile_len is not None else [image]
        out = self.processor(text=[self.image_token], images=images, return_tensors="pt")
        ids = tuple(int(i) for i in out["input_ids"][0])
        offsets = [k for k, i in enumerate(ids) if i == self.image_token_id]
        tile = self.tile_len or len(offsets)
        tiles = [offsets[k: k + tile] for k in range(0, len(offsets), tile)] or [[]]
        side = math.isqrt(tile)
        rows, cols = (side, side) if side * side == tile else (1, tile)
        labels: dict[int, str] = {}
        for t, tile_offsets in enumerate(tiles):
            last = t == len(tiles) - 1  # the whole image (Idefics3 puts its global view last)
            names = _grid_labels(number, rows, cols, "" if last else f"tile {t + 1}")
            labels.update(zip(tile_offsets, names))
        tensors = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")
                   and isinstance(v, torch.Tensor)}
        return PreparedImage(ids=ids, labels=labels, patches=tuple(tiles[-1]), rows=rows,
                             cols=cols, width=image.width, height=image.height,
                             tensors=tensors)

    def prefill_inputs(self, ids: Sequence[int], context: VisionContext,
                       model: Any) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {"input_ids": torch.tensor([list(ids)])}
        for key in context.images[0].tensors:
            parts = [image.tensors[key] for image in context.images]
            # Idefics3 stacks tiles as [batch, tiles, ...]; LLaVA as [images, ...].
            dim = 1 if parts[0].dim() == 5 or key == "pixel_attention_mask" else 0
            inputs[key] = torch.cat(parts, dim=dim)
        if "pixel_values" in inputs:
            dtype = model.get_input_embeddings().weight.dtype
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs


class VisionGeneration(CausalLMGeneration):
    """A started vision run; ``images`` tells where each image's patch grid sits."""

    def __init__(self, engine: "VisionLanguageEngine", plan: Plan,
                 cancelled: Callable[[], bool] | None) -> None:
        super().__init__(engine, plan, cancelled)
        self.images: tuple[ImageSpan, ...] = plan.extra.spans if plan.extra else ()


class VisionLanguageEngine(CausalLMEngine):
    """A causal LM whose prompts may hold images (any number, anywhere among the parts)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self.vision: VisionAdapter = loaded.processor
        self.image_token_id = self.vision.image_token_id
        self.description = VLM1_DOMAIN if loaded.name == VLM1_NAME else ""

    def context(self, parts: Sequence[PromptPart]) -> tuple[list[int], VisionContext | None]:
        """Parts -> context ids with image tokens, and the images' spans and tensors.

        Images are decoded and prepared here, in planning, so a bad image fails the request
        before any model work, with an error naming its ``inputs[i]``.
        """
        ids: list[int] = []
        spans: list[ImageSpan] = []
        images: list[PreparedImage] = []
        labels: dict[int, str] = {}
        for position, part in enumerate(parts):
            if isinstance(part, ImagePart):
                prepared = self.vision.prepare(decode_image(part.data, position), len(spans) + 1)
                start = len(ids)
                spans.append(ImageSpan(image=len(spans) + 1, start=start,
                                       length=len(prepared.ids), rows=prepared.rows,
                                       cols=prepared.cols,
                                       patches=tuple(start + p for p in prepared.patches),
                                       width=prepared.width, height=prepared.height))
                labels.update({start + k: text for k, text in prepared.labels.items()})
                images.append(prepared)
                ids.extend(prepared.ids)
            elif isinstance(part, TextPart):
                ids.extend(self.encode(part.text))
            elif isinstance(part, TokenIdsPart):
                if self.image_token_id in part.ids:
                    raise InvalidInput(
                        f"inputs[{position}]: token id {self.image_token_id} is {self.name}'s "
                        "image placeholder; send the image itself as an image part",
                        field=f"inputs[{position}]", value=self.image_token_id)
                ids.extend(self.check_token_ids(part, position))
        if not ids:
            raise InvalidInput("inputs: the prompt tokenised to no tokens", field="inputs",
                               value="")
        return ids, (VisionContext(tuple(spans), tuple(images), labels) if spans else None)

    def start(self, parts: Sequence[PromptPart], settings: SampleSettings,
              cancelled: Callable[[], bool] | None = None) -> VisionGeneration:
        """Validate now (images decoded); return a run whose iteration does the model work."""
        return VisionGeneration(self, self.plan(parts, settings), cancelled)

    def _prefill(self, plan: Plan, cache: Any, *, all_logits: bool,
                 attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if plan.extra is None:
            return super()._prefill(plan, cache, all_logits=all_logits, attention=attention)
        inputs = self.vision.prefill_inputs(plan.prompt_ids, plan.extra, self.model)
        return self._forward(plan.prompt_ids, cache, all_logits=all_logits,
                             attention=attention, inputs=inputs, prefill=plan.prefill)

    def _score_prompt(self, plan: Plan, logits: torch.Tensor) -> Iterator[Token]:
        """As for text, but image tokens read ``<image i: patch r,c>`` and have no probability
        of their own (their id is a placeholder; their content is the image)."""
        labels = plan.extra.labels if plan.extra is not None else {}
        for token in super()._score_prompt(plan, logits):
            text = labels.get(token.position if token.position is not None else -1)
            if text is None:
                yield token
            else:
                yield dataclasses.replace(token, token_str=text, prob=0.0, raw_prob=None,
                                          logprob=None, rank=None)


# ----- loaders --------------------------------------------------------------------------------


def load_vlm1(progress: Progress) -> LoadedModel:
    """The bundled ``vlm-1``: SmolLM2-135M-Instruct (its own copy) plus the trained tower."""
    from sampler_core.engine.models import bundled_gguf_path, load_gguf

    if not (VLM1_FOLDER / "model.safetensors").is_file():
        raise UnknownModel(f"vlm-1's weights are missing from {VLM1_FOLDER}; train them with "
                           "scripts/train_vlm.py")
    base = load_gguf(bundled_gguf_path(), VLM1_NAME, progress)
    progress("loading the vlm-1 vision tower", 0.9)
    tower = load_tower(VLM1_FOLDER)
    # A reserved token that chat text never uses; image tokens carry it as their id.
    image_token_id = int(base.tokenizer.convert_tokens_to_ids("<empty_output>"))
    progress("ready", 1.0)
    return LoadedModel(name=VLM1_NAME, model=base.model, tokenizer=base.tokenizer,
                       processor=TowerAdapter(tower, image_token_id))


#: ``model_type`` values of the families the local-folder loader takes.
VISION_MODEL_TYPES = ("idefics3", "smolvlm", "llava")


def is_vision_folder(folder: Path) -> bool:
    """True for a Hugging Face folder whose config names a supported vision-language family."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in VISION_MODEL_TYPES


def load_vision_folder(folder: Path, name: str, progress: Progress) -> LoadedModel:
    """A local SmolVLM / Idefics3 or LLaVA folder -> model, tokenizer and processor adapter."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sampler_core.engine.attention import ATTENTION_IMPLEMENTATION

    progress(f"loading {name} from {folder}", 0.2)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=ATTENTION_IMPLEMENTATION)
        progress("loading the processor", 0.8)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UnknownModel(f"cannot load a vision-language model from {folder}: {exc}") from exc
    model = finish_model(model)
    progress("ready", 1.0)
    return LoadedModel(name=name, model=model, tokenizer=processor.tokenizer,
                       processor=ProcessorAdapter(processor, model))
