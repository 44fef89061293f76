"""The vision tower of ``vlm-1``: a small conv + transformer patch encoder and an MLP projector.

LLaVA-style: the image (64x64 RGB) becomes a ``grid x grid`` map of patch features, a tiny
transformer mixes them (so every patch token also knows the whole scene, which counting needs),
and a two-layer MLP projects each patch into the language model's embedding space. Those
vectors take the place of token embeddings in the prompt; the language model stays frozen.

With a word vocabulary (``TowerConfig.vocab``, token ids of the language model) the projector
speaks the language model's own language: it scores the vocabulary's words for each of the
16 image tokens and outputs the softmax mix of those words' input embeddings (stored with the
tower as ``vocab_embeds``), plus a small learned per-slot vector. Trained so that the 16
tokens read like a sentence ("The image shows one red circle at the top left. ..."), the
frozen chat model answers by copying from its context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class TowerConfig:
    """Shape of the tower; saved next to the weights as ``config.json``."""

    image_size: int = 64
    grid: int = 4
    width: int = 128
    layers: int = 2
    heads: int = 4
    llm_hidden: int = 576
    #: Which language model the projector was trained onto (a registry name).
    language_model: str = "smollm2-135m-instruct"
    #: Token ids the projector mixes (empty: a free MLP projector, the older design).
    vocab: tuple[int, ...] = ()

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(8, cout), nn.GELU())


class VisionTower(nn.Module):
    """Image tensor ``[B, 3, S, S]`` in [0, 1] -> ``[B, grid*grid, llm_hidden]`` embeddings."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        if config.image_size != config.grid * 16:
            raise ValueError(f"image_size must be 16 * grid ({config.grid * 16}), "
                             f"got {config.image_size}")
        # S -> S/2 -> S/4 -> S/8 -> S/16 = grid: four stride-2 stages, cheap enough to train
        # on two CPU cores.
        self.conv = nn.Sequential(_block(3, 32, 2), _block(32, 64, 2), _block(64, 96, 2),
                                  _block(96, w, 2))
        self.to_width = nn.Linear(w, w)
        self.pos = nn.Parameter(torch.zeros(1, config.num_patches, w))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(w, config.heads, 4 * w, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        out = len(config.vocab) or config.llm_hidden
        self.projector = nn.Sequential(nn.Linear(w, config.llm_hidden), nn.GELU(),
                                       nn.Linear(config.llm_hidden, out))
        if config.vocab:
            # Filled by training from the language model's embedding table; saved with the tower.
            self.register_buffer("vocab_embeds", torch.zeros(len(config.vocab), config.llm_hidden))
            self.slot_bias = nn.Parameter(torch.zeros(config.num_patches, config.llm_hidden))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> patch features ``[B, grid*grid, width]`` (row-major patches)."""
        x = self.conv((pixels - 0.5) / 0.25)
        x = self.to_width(x.flatten(2).transpose(1, 2)) + self.pos
        return self.norm(self.mixer(x))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features -> language-model input embeddings ``[B, grid*grid, llm_hidden]``."""
        out = self.projector(features)
        if not self.config.vocab:
            return out
        return out.softmax(-1) @ self.vocab_embeds + self.slot_bias

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(pixels))


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB Pillow image -> ``[3, size, size]`` float tensor in [0, 1] (resized if needed)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def save_tower(tower: VisionTower, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata=metadata or {})
    config = asdict(tower.config)
    config["vocab"] = list(config["vocab"])
    (folder / "config.json").write_text(json.dumps(config) + "\n")


def load_tower(folder: Path) -> VisionTower:
    """Read a tower saved by :func:`save_tower` (eval mode, no gradients)."""
    raw = json.loads((folder / "config.json").read_text())
    raw["vocab"] = tuple(raw.get("vocab", ()))
    config = TowerConfig(**raw)
    tower = VisionTower(config)
    tower.load_state_dict(load_file(str(folder / "model.safetensors")))
    tower.eval()
    tower.requires_grad_(False)
    return tower
