"""Train ``vlm-1``: a small vision tower and projector onto the frozen SmolLM2-135M-Instruct.

LLaVA-style, on synthetic images from ``sampler_core.vision.synthetic``, reproducible from
``--seed``, sized for a 2-core CPU (about 10 minutes of training):

1. Stage 1 (no language model run, ~1.5 min): the patch encoder learns colour, shape, count
   and position (small classification heads on its pooled features), and the projector learns
   to make the 16 image tokens *read as words*: per token it scores a small vocabulary of the
   language model's own tokens (cross-entropy) so that the tokens spell the scene's
   description, "The image shows one red circle at the top left. To answer your question:"
   (newline-padded to 16). The tower outputs the softmax mix of those words' input
   embeddings, so the frozen chat model already answers by copying from its context.
2. Stage 2 (projector + per-token vectors through the frozen language model, encoder frozen):
   chat-formatted questions with the image tokens before the question in the user turn
   (``image_first``) or after the whole chat prompt (``image_last``, what the SDK's
   ``inputs=(prompt, image)`` sends) - the two layouts ``evaluate.py`` scores; the loss is the
   reply sentence's tokens (``Scene.reply``); batches are padded to a multiple of 8 tokens.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler_core.engine import get_engine  # noqa: E402
from sampler_core.engine.vision_tower import (TowerConfig, VisionTower, save_tower,  # noqa: E402
                                              to_pixels)
from sampler_core.vision.synthetic import (COLOURS, COUNT_WORDS, COUNTS,  # noqa: E402
                                           POSITIONS, SHAPES, make_example, make_scene)

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


#: What the 16 image tokens are trained to read: a sentence the chat model can copy from.
#: Padded with newlines to the grid's 16 tokens.
TEMPLATE_END = " To answer your question:"


def description(scene) -> str:
    """'The image shows one red circle at the top left. To answer your question:'."""
    plural = "s" if scene.count > 1 else ""
    where = ""
    if scene.position is not None:
        where = " in the center" if scene.position == "center" else f" at the {scene.position}"
    return (f"The image shows {COUNT_WORDS[scene.count]} {scene.colour} {scene.shape}{plural}"
            f"{where}.{TEMPLATE_END}")


class Vocabulary:
    """The description words' token ids, and each scene's 16 target slots over them."""

    def __init__(self, engine, slots: int) -> None:
        self.engine, self.slots = engine, slots
        self.pad = engine.encode("\n")
        scenes = [(c, s, n, p) for c in COLOURS for s in SHAPES for n in COUNTS
                  for p in ([None] + (list(POSITIONS) if n == 1 else []))]
        ids: set[int] = set(self.pad)
        for facts in scenes:
            ids.update(self.ids(SimpleScene(*facts)))
        self.vocab = tuple(sorted(ids))
        self.index = {t: k for k, t in enumerate(self.vocab)}

    def ids(self, scene) -> list[int]:
        ids = self.engine.encode(description(scene))
        if len(ids) > self.slots:
            raise ValueError(f"description of {scene} is {len(ids)} tokens, over {self.slots}")
        return ids + self.pad * (self.slots - len(ids))

    def targets(self, scenes: list) -> torch.Tensor:
        return torch.tensor([[self.index[t] for t in self.ids(s)] for s in scenes])


class SimpleScene:
    """Scene facts without an image (to enumerate the vocabulary)."""

    def __init__(self, colour: str, shape: str, count: int, position: str | None) -> None:
        self.colour, self.shape, self.count, self.position = colour, shape, count, position


def stage1(tower: VisionTower, heads: AuxHeads, vocab: Vocabulary, rng: random.Random,
           steps: int, batch: int) -> None:
    """Encoder + projector's word scores: classify the scene and read out its description."""
    params = [p for n, p in tower.named_parameters() if n != "slot_bias"]
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        scenes = [make_scene(rng) if i % 3 else make_scene(rng, single=True)
                  for i in range(batch)]
        pixels = torch.stack([to_pixels(s.image, tower.config.image_size) for s in scenes])
        features = tower.features(pixels)
        loss, acc = heads.loss(features, scenes)
        logits = tower.projector(features)
        targets = vocab.targets(scenes)
        words = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = loss + words
        acc["words"] = float(words.detach())
        acc["sentence"] = float((logits.argmax(-1) == targets).all(-1).float().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
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
        self.system_ids = engine.encode(self.system)

    def segments(self, question: str, rng: random.Random) -> list:
        """Where the image goes: before the question in the user turn (``image_first``) or
        after the whole chat prompt (``image_last``, as the SDK's ``inputs=(prompt, image)``
        sends it) - the two layouts ``sampler_core.vision.evaluate`` scores."""
        enc = self.engine.encode
        if rng.random() < 0.5:
            return [IMG, enc("\n" + question + self.end_user)]
        return [enc(question + self.end_user), IMG]

    def loss(self, examples: list, rng: random.Random) -> tuple[torch.Tensor, dict]:
        pixels = torch.stack([to_pixels(e.scene.image, self.tower.config.image_size)
                              for e in examples])
        with torch.no_grad():  # the encoder is done after stage 1
            features = self.tower.features(pixels)
        images = self.tower.project(features)
        rows, targets = [], []
        for n, example in enumerate(examples):
            answer = self.engine.encode(example.reply) + [self.end_id]
            pieces = [self.embed(torch.tensor(self.system_ids))]
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
        # The whole sequence, system prompt included: a reused KV-cache prefix did not match
        # the full forward pass (logits off by up to 30), which had stage 2 train on garbage.
        hidden = self.llm.model(inputs_embeds=x, use_cache=False).last_hidden_state
        index_b = torch.tensor([n for n, t in enumerate(targets) for _ in t])
        index_p = torch.tensor([p for t in targets for p, _ in t])
        labels = torch.tensor([tok for t in targets for _, tok in t])
        logits = self.llm.lm_head(hidden[index_b, index_p]).float()
        lm_loss = F.cross_entropy(logits, labels)
        # Whole-reply accuracy under teacher forcing, per kind: a cheap progress signal.
        right = (logits.argmax(-1) == labels).tolist()
        hits, k = [], 0
        for t in targets:
            hits.append(all(right[k: k + len(t)]))
            k += len(t)
        by_kind: dict[str, list[bool]] = {}
        for example, hit in zip(examples, hits):
            by_kind.setdefault(example.kind, []).append(hit)
        return lm_loss, {
            "lm": float(lm_loss), **{k: sum(v) / len(v) for k, v in by_kind.items()}}


def stage2(trainer: Stage2, rng: random.Random, steps: int, batch: int,
           lr: float) -> None:
    tower = trainer.tower
    # Only the projector's word scores and the per-slot vectors learn here.
    opt = torch.optim.AdamW([
        {"params": list(tower.projector.parameters()), "peak": lr / 10},
        {"params": [tower.slot_bias], "peak": lr},
    ], weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, group["peak"])
        examples = [make_example(rng) for _ in range(batch)]
        loss, stats = trainer.loss(examples, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
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
    parser.add_argument("--stage1-steps", type=int, default=1500)
    parser.add_argument("--stage1-batch", type=int, default=32)
    parser.add_argument("--stage2-steps", type=int, default=250)
    parser.add_argument("--stage2-lr", type=float, default=2e-3,
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
        vocab = Vocabulary(engine, TowerConfig().num_patches)
        tower = VisionTower(TowerConfig(llm_hidden=engine.model.config.hidden_size,
                                        vocab=vocab.vocab))
        table = engine.model.get_input_embeddings().weight.detach()
        tower.vocab_embeds.copy_(table[list(vocab.vocab)].float())
        heads = AuxHeads(tower.config.width)
        log(f"tower: {sum(p.numel() for p in tower.parameters())} parameters")
        stage1(tower, heads, vocab, rng, args.stage1_steps, args.stage1_batch)
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
