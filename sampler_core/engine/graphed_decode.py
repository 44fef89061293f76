"""Decode steps on a GPU as one captured CUDA graph per run.

On a GPU a decode step of a small model is about a thousand tiny kernels (for the default
model: 30 layers of norms, projections, rotary, attention and MLP). Launched one by one from
Python they cost several milliseconds a token while the GPU itself works for a fraction of
that. A CUDA graph records the kernels of one step once and replays them with one launch.

A graph replays fixed shapes at fixed addresses, so the step here is written for that: the
token and its position live in device tensors that the replay reads; each layer writes its
key and value into the cache at that position (``index_copy_``) and attends over the cache's
whole capacity, the positions not yet reached masked to -inf so that they weigh exactly 0.
The cache starts zeroed (``FastLlama.new_cache``) so that no stale NaN can leak in through
0 * NaN.

Inside a graph the cost is the number of kernels (each a few microseconds however small), so
the step fuses where torch offers it: one RMSNorm kernel (``F.rms_norm``); rotary for queries
and keys together as one product with the position's rotation matrix (built once a step from
a fixed +-1 half-turn matrix: every other term of each output is a zero); the attention scale
and the mask folded into the scores' product (``baddbmm``); the softmax writing the attention
rows in place; the residual adds into the output projections (``addmm``). That is about 17
kernels a layer instead of 38 (522 a step, measured on an H100; 609 before the rotary and the
rows were folded, with replay 2.23 ms a step against 2.03 now). The float32 values agree with
the runner's loop to rounding (the tests compare them on the CPU); only the softmax and the
weighted sum run over more (zero) terms.

``StaticDecode.step`` runs on any device (the tests compare it with the loop on the CPU);
``StaticDecode.run`` captures it into a graph on first use and replays it after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sampler_core.engine.fast_llama import FastLlama, KVCache


class StaticDecode:
    """One run's decode step with fixed shapes and addresses, captured as a CUDA graph."""

    def __init__(self, runner: "FastLlama", cache: "KVCache", attention: bool) -> None:
        capacity = cache.keys.shape[2]
        device = cache.keys.device
        # The cache's tensors, not the cache: the cache keeps this object (``KVCache.graphs``),
        # and no reference cycle may hold a run's GPU memory until the garbage collector runs.
        self.runner, self._keys, self._values = runner, cache.keys, cache.values
        #: What a replay reads: the new token's id and its position.
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(capacity, device=device)
        # Held here: a graph keeps addresses, not references, so its inputs must outlive it
        # (the runner's rotary table may be replaced by a longer one later).
        self._cos, self._sin = runner._rotary(0, capacity)
        #: ``x @ _half_turn`` is ``cat(-x[half:], x[:half])``, the rotary's half rotation.
        half = runner.head_dim // 2
        self._half_turn = torch.zeros(runner.head_dim, runner.head_dim, device=device)
        self._half_turn[torch.arange(half) + half, torch.arange(half)] = -1.0
        self._half_turn[torch.arange(half), torch.arange(half) + half] = 1.0
        #: The attention of the new position, ``[layer, head, capacity]`` (0 past it), or None.
        self.rows = (torch.zeros(runner.num_layers, runner.num_heads, capacity, device=device)
                     if attention else None)
        self._graph: Any = None
        self._logits: torch.Tensor | None = None

    def step(self) -> torch.Tensor:
        """The new position through the model, read from ``token`` and ``position``; returns
        logits ``[1, vocab]`` and fills ``rows``."""
        r = self.runner
        rotated = r.q_size + r.kv_size  # queries and keys, side by side in each q/k/v row
        x = r.embed.index_select(0, self.token)  # [1, hidden]
        cos = self._cos.index_select(0, self.position)  # [1, head_dim]
        sin = self._sin.index_select(0, self.position)
        # The position's rotary as one matrix, once a step: x * cos + (x @ half_turn) * sin is
        # x @ (diag(cos) + half_turn * sin); then each layer rotates with one product, not three
        # kernels (each output sums two non-zero terms: within a rounding of the loop's).
        turn = torch.addcmul(torch.diag_embed(cos[0]), self._half_turn, sin)
        # 0 where a position is already in the cache (or is this one), -inf past it.
        mask = torch.where(self._slots <= self.position, 0.0, float("-inf"))
        for index, (w_in, w_qkv, w_o, w_post, w_gate_up, w_down) in enumerate(r.layers):
            # Attention block: q/k/v, rotary, cache write at the position, masked attention.
            qkv = F.linear(self._norm(x, w_in), w_qkv)
            qk = qkv[:, :rotated].view(-1, r.head_dim)  # [head + kv_head, head_dim]
            qk = qk @ turn
            keys, values = self._keys[index], self._values[index]  # [kv_head, capacity, dim]
            keys.index_copy_(1, self.position, qk[r.num_heads:].unsqueeze(1))
            values.index_copy_(1, self.position, qkv[:, rotated:].view(r.num_kv, 1, r.head_dim))
            scores = torch.baddbmm(mask, qk[:r.num_heads].view(r.num_kv, r.group, r.head_dim),
                                   keys.transpose(1, 2), alpha=r.scale)  # [kv_head, group, capacity]
            # When the rows are asked for, the softmax writes them in place (no copy kernel).
            weights = (torch.softmax(scores, dim=-1) if self.rows is None else torch.softmax(
                scores, dim=-1, out=self.rows[index].view(scores.shape)))
            x = torch.addmm(x, (weights @ values).view(1, r.q_size), w_o.t())
            # MLP block.
            gate_up = F.linear(self._norm(x, w_post), w_gate_up)
            act = F.silu(gate_up[:, :r.intermediate]) * gate_up[:, r.intermediate:]
            x = torch.addmm(x, act, w_down.t())
        return F.linear(self._norm(x, r.final_norm), r.lm_head)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in one kernel where torch has a fused one (the loop's ``_norm`` is five)."""
        return F.rms_norm(x, (x.shape[-1],), weight, self.runner.eps)

    def run(self, token: torch.Tensor | int, position: int
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the step for ``token`` (an id, or a device tensor ``[1]``) at ``position``;
        returns logits ``[1, vocab]`` and the attention ``[layer, head, position + 1]`` (or
        None), both on the device and overwritten by the next replay. An id goes in by a fill
        (a kernel with the id as its argument), so the host does not wait for the GPU here."""
        if isinstance(token, int):
            self.token.fill_(token)
        else:
            self.token.copy_(token)
        self.position.fill_(position)
        if self._graph is None:
            self._capture()
        self._graph.replay()
        rows = None if self.rows is None else self.rows[:, :, :position + 1]
        return self._logits, rows  # type: ignore[return-value]

    def _capture(self) -> None:
        """Record ``step`` into a CUDA graph. The warm-up runs it once for real (on a side
        stream, as torch asks, so lazy initialisation such as cuBLAS workspaces stays out of
        the graph); it writes this position's key and value, which the replay rewrites."""
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream(self.token.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread copying another run's logits to the host during the
        # capture is not an error.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._logits = self.step()
        self._graph = graph
