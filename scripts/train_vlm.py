"""Train ``vlm-1``: a small vision tower and projector onto the frozen SmolLM2-135M-Instruct.

LLaVA-style, on synthetic images from ``sampler_core.vision.synthetic``, reproducible from
``--seed``, sized for a 2-core CPU (about 15-25 minutes):

1. Stage 1 (no language model run): the patch encoder learns colour, shape, count and
   position with small classification heads on its pooled features, and the projector learns
   to put each patch near the embedding of words for what it shows (" red" + " circle" where a
   red circle is, " background" elsewhere). Cheap, and stage 2 then starts from image tokens
   the language model half reads already, each standing for its own patch (so attention over
   the patch grid points at the shapes).
2. Stage 2 (tower + projector through the frozen language model): chat-formatted questions with
   the image's patch embeddings spliced into the user turn (before the question, after it, or
   after the assistant header, as the SDK's ``inputs=(prompt, image)`` sends it); the loss is the
   answer's tokens. The system prompt, the same for every example, is computed once and reused
   as a KV-cache prefix; batches are padded to a multiple of 8 tokens so few shapes occur.

Then it saves ``model.safetensors`` + ``config.json`` into ``--out`` and, unless
``--no-eval``, scores the held-out test set through the real engine (``get_engine("vlm-1")``)
and writes ``eval.json`` next to the weights.

    .venv/bin/python scripts/train_vlm.py            # train, save, evaluate
    .venv/bin/python scripts/train_vlm.py --eval-only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler_core.engine import get_engine  # noqa: E402
from sampler_core.engine.vision_tower import (TowerConfig, VisionTower, save_tower,  # noqa: E402
                                              to_pixels)
from sampler_core.vision.synthetic import (COLOURS, COUNTS, POSITIONS, SHAPES,  # noqa: E402
                                           make_example, make_scene)

DEFAULT_OUT = ROOT / "sampler_core" / "data" / "vlm-1"
IMG = None  # marks where the image's patch embeddings go in a segment list


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class AuxHeads(nn.Module):
    """Stage-1 classifiers on the tower's pooled patch features (not shipped)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS))
        self.shape = nn.Linear(width, len(SHAPES))
        self.count = nn.Linear(width, len(COUNTS))
        self.position = nn.Linear(width, len(POSITIONS))

    def loss(self, features: torch.Tensor, scenes: list) -> tuple[torch.Tensor, dict[str, float]]:
        pooled = features.mean(dim=1)
        targets = {
            "colour": [list(COLOURS).index(s.colour) for s in scenes],
            "shape": [SHAPES.index(s.shape) for s in scenes],
            "count": [COUNTS.index(s.count) for s in scenes],
            "position": [POSITIONS.index(s.position) if s.position else -100 for s in scenes],
        }
        total = torch.zeros(())
        accuracy: dict[str, float] = {}
        for name, values in targets.items():
            target = torch.tensor(values)
            logits = getattr(self, name)(pooled)
            total = total + F.cross_entropy(logits, target, ignore_index=-100)
            mask = target >= 0
            accuracy[name] = float((logits.argmax(-1)[mask] == target[mask]).float().mean())
        return total, accuracy


def lr_at(step: int, steps: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def occupied(image, grid: int) -> torch.Tensor:
    """``[grid*grid]`` bools: which patches hold at least a little of a shape."""
    rgb = torch.from_numpy(np.asarray(image, dtype=np.int16))
    counts = image.getcolors(image.width * image.height)
    background = torch.tensor(max(counts)[1], dtype=torch.int16)
    differs = (rgb - background).abs().sum(-1) > 60
    side = image.width // grid
    cells = differs.reshape(grid, side, grid, side).float().mean(dim=(1, 3))
    return (cells > 0.06).flatten()


def word_targets(engine, scenes: list, grid: int) -> torch.Tensor:
    """``[B, grid*grid, hidden]``: per patch, the embedding sum of its words (see stage 1)."""
    table = engine.model.get_input_embeddings().weight.detach()

    def embed(word: str) -> torch.Tensor:
        return table[engine.encode(" " + word)].sum(0)

    cache: dict[str, torch.Tensor] = {}
    out = []
    for scene in scenes:
        key = f"{scene.colour}/{scene.shape}"
        if key not in cache:
            cache[key] = embed(scene.colour) + embed(scene.shape)
        if "background" not in cache:
            cache["background"] = embed("background")
        mask = occupied(scene.image, grid)
        out.append(torch.stack([cache[key] if m else cache["background"] for m in mask]))
    return torch.stack(out)


def stage1(tower: VisionTower, heads: AuxHeads, engine, rng: random.Random, steps: int,
           batch: int) -> None:
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=2e-3,
                            weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        scenes = [make_scene(rng) if i % 4 else make_scene(rng, single=True)
                  for i in range(batch)]
        pixels = torch.stack([to_pixels(s.image, tower.config.image_size) for s in scenes])
        features = tower.features(pixels)
        loss, acc = heads.loss(features, scenes)
        targets = word_targets(engine, scenes, tower.config.grid)
        align = F.mse_loss(tower.projector(features), targets) / targets.pow(2).mean()
        loss = loss + align
        acc["align"] = float(align)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"stage1 step {step}/{steps} loss {float(loss):.3f} " +
                " ".join(f"{k} {v:.2f}" for k, v in acc.items()))


class Stage2:
    """Chat-formatted examples through the frozen language model."""

    def __init__(self, engine, tower: VisionTower, heads: AuxHeads) -> None:
        self.engine, self.tower, self.heads = engine, tower, heads
        self.llm = engine.model  # frozen (requires_grad False), float32 as at inference
        self.llm.requires_grad_(False)
        self.embed = self.llm.get_input_embeddings()
        full = engine.chat_prompt("QUESTION")
        # The system prompt and the user turn's header are the same for every example.
        self.system = full[: full.index("<|im_start|>user")] + "<|im_start|>user\n"
        self.end_user = "<|im_end|>\n<|im_start|>assistant\n"
        self.end_id = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        with torch.no_grad():
            out = self.llm(input_ids=torch.tensor([engine.encode(self.system)]), use_cache=True)
        self.prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.prefix_len = len(engine.encode(self.system))

    def segments(self, question: str, rng: random.Random) -> list:
        """Where the image goes relative to the question, varied as users will vary it."""
        enc = self.engine.encode
        r = rng.random()
        if r < 0.6:
            sep = rng.choice(["\n", "", " "])
            return [IMG, enc(sep + question + self.end_user)]
        if r < 0.8:
            sep = rng.choice(["\n", " ", ""])
            return [enc(question + sep), IMG, enc(self.end_user)]
        return [enc(question + self.end_user), IMG]

    def cache(self, batch: int) -> DynamicCache:
        cache = DynamicCache(config=self.llm.config)
        for index, (k, v) in enumerate(self.prefix):
            cache.update(k.expand(batch, -1, -1, -1).contiguous(),
                         v.expand(batch, -1, -1, -1).contiguous(), index)
        return cache

    def loss(self, examples: list, rng: random.Random) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([to_pixels(e.scene.image, self.tower.config.image_size)
                              for e in examples])
        features = self.tower.features(pixels)
        images = self.tower.projector(features)
        rows, targets = [], []
        for n, example in enumerate(examples):
            answer = self.engine.encode(example.reply) + [self.end_id]
            pieces = []
            for segment in self.segments(example.question, rng):
                pieces.append(images[n] if segment is IMG else
                              self.embed(torch.tensor(segment)))
            start = sum(p.shape[0] for p in pieces)
            pieces.append(self.embed(torch.tensor(answer[:-1])))
            rows.append(torch.cat(pieces))
            # position p predicts token p+1: the answer's tokens are predicted from start-1 on.
            targets.append([(start - 1 + i, t) for i, t in enumerate(answer)])
        length = -(-max(r.shape[0] for r in rows) // 8) * 8  # few distinct shapes
        x = torch.zeros(len(rows), length, rows[0].shape[1])
        for n, row in enumerate(rows):
            x[n, : row.shape[0]] = row  # right padding: causal attention never sees it
        hidden = self.llm.model(inputs_embeds=x, past_key_values=self.cache(len(rows)),
                                use_cache=True).last_hidden_state
        index_b = torch.tensor([n for n, t in enumerate(targets) for _ in t])
        index_p = torch.tensor([p for t in targets for p, _ in t])
        labels = torch.tensor([tok for t in targets for _, tok in t])
        logits = self.llm.lm_head(hidden[index_b, index_p]).float()
        lm_loss = F.cross_entropy(logits, labels)
        aux_loss, _ = self.heads.loss(features, [e.scene for e in examples])
        # Whole-reply accuracy under teacher forcing, per kind: a cheap progress signal.
        right = (logits.argmax(-1) == labels).tolist()
        hits, k = [], 0
        for t in targets:
            hits.append(all(right[k: k + len(t)]))
            k += len(t)
        by_kind: dict[str, list[bool]] = {}
        for example, hit in zip(examples, hits):
            by_kind.setdefault(example.kind, []).append(hit)
        return lm_loss + 0.2 * aux_loss, {
            "lm": float(lm_loss), **{k: sum(v) / len(v) for k, v in by_kind.items()}}


def stage2(trainer: Stage2, rng: random.Random, steps: int, batch: int,
           lr: float) -> None:
    tower = trainer.tower
    encoder = [p for n, p in tower.named_parameters() if not n.startswith("projector")]
    opt = torch.optim.AdamW([
        {"params": encoder + list(trainer.heads.parameters()), "peak": lr / 4},
        {"params": list(tower.projector.parameters()), "peak": lr},
    ], weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, group["peak"])
        examples = [make_example(rng) for _ in range(batch)]
        loss, stats = trainer.loss(examples, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            per_step = (time.time() - started) / (step + 1)
            log(f"stage2 step {step}/{steps} loss {float(loss):.3f} " +
                " ".join(f"{k} {v:.2f}" for k, v in sorted(stats.items())) +
                f" ({per_step:.1f} s/step)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage1-batch", type=int, default=32)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--stage2-lr", type=float, default=3e-3,
                        help="projector's peak learning rate (the encoder gets a quarter)")
    parser.add_argument("--stage2-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-kind", type=int, default=50, help="test questions per kind")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    if not args.eval_only:
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        engine = get_engine("")
        tower = VisionTower(TowerConfig(llm_hidden=engine.model.config.hidden_size))
        heads = AuxHeads(tower.config.width)
        log(f"tower: {sum(p.numel() for p in tower.parameters())} parameters")
        stage1(tower, heads, engine, rng, args.stage1_steps, args.stage1_batch)
        stage2(Stage2(engine, tower, heads), rng, args.stage2_steps, args.stage2_batch,
               args.stage2_lr)
        minutes = (time.time() - started) / 60
        save_tower(tower, args.out, metadata={
            "seed": str(args.seed), "stage1_steps": str(args.stage1_steps),
            "stage2_steps": str(args.stage2_steps), "train_minutes": f"{minutes:.1f}"})
        log(f"saved to {args.out} after {minutes:.1f} min")
    if not args.no_eval:
        from sampler_core.vision.evaluate import evaluate_bundled
        report = evaluate_bundled(per_kind=args.per_kind, folder=args.out, log=log)
        (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"eval: {json.dumps(report['accuracy'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
