"""A lean forward pass over a transformers Llama model's own weights.

transformers' generic forward spends most of a decode step in Python and bookkeeping (mask
building, cache objects, hooks): for this 135M model that is ~60 ms a token against a ~22 ms
memory floor. This runner does the same arithmetic, in float32 and in the same order, with:

- fused q/k/v and gate/up projections (the module weights become views into the fused
  tensors, so no memory is duplicated and the transformers path keeps working);
- a preallocated KV cache sized for the run (no growing concatenations);
- decode attention as two small matmuls per layer, which yields the attention weights for
  free: recording attention costs nothing extra, and prefill computes only the last row.

Only LlamaForCausalLM-shaped models (Llama, SmolLM2, Mistral without sliding window) use it;
others take the transformers path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Keys and values of one run: ``[layer, kv_head, position, head_dim]``, filled to ``length``."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0


def _fuse(module: Any, names: tuple[str, ...]) -> torch.Tensor:
    """Concatenate linear weights and make each module weight a view into the result."""
    linears = [getattr(module, n) for n in names]
    fused = torch.cat([l.weight.detach() for l in linears], dim=0).contiguous()
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused


def supports(model: Any) -> bool:
    """Whether this runner can drive the model exactly."""
    config = model.config
    return (type(model).__name__ == "LlamaForCausalLM"
            and getattr(config, "hidden_act", "silu") == "silu"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "pretraining_tp", 1) == 1
            and next(model.parameters()).dtype == torch.float32)


class FastLlama:
    """Runs a LlamaForCausalLM step by step with a preallocated cache."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.model = model
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv
        self.scale = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.embed = model.model.embed_tokens.weight
        self.lm_head = model.lm_head.weight
        self.final_norm = model.model.norm.weight
        self.rotary = model.model.rotary_emb
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv * self.head_dim
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                _fuse(attn, ("q_proj", "k_proj", "v_proj")),
                attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                _fuse(mlp, ("gate_proj", "up_proj")),
                mlp.down_proj.weight,
            ))
        self.intermediate = self.layers[0][5].shape[1]

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to ``capacity`` positions."""
        shape = (self.num_layers, self.num_kv, capacity, self.head_dim)
        return KVCache(torch.empty(shape), torch.empty(shape))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As LlamaRMSNorm, in float32.
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, cache: KVCache, *,
                inputs_embeds: torch.Tensor | None = None, all_logits: bool = False,
                attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``T`` new positions (ids ``[T]`` or embeddings ``[T, hidden]``).

        Returns logits (``[T, vocab]`` or ``[1, vocab]``) and, when asked, the attention of the
        last position: ``[layer, head, context]``.
        """
        x = self.embed[input_ids] if inputs_embeds is None else inputs_embeds.float()
        steps, start = x.shape[0], cache.length
        end = start + steps
        positions = torch.arange(start, end).unsqueeze(0)
        cos, sin = self.rotary(x.unsqueeze(0), positions)
        cos, sin = cos[0].unsqueeze(0), sin[0].unsqueeze(0)  # [1, T, head_dim]
        rows = torch.empty(self.num_layers, self.num_heads, end) if attention else None
        for index, (w_in, w_qkv, w_o, w_post, w_gate_up, w_down) in enumerate(self.layers):
            # Attention block.
            qkv = F.linear(self._norm(x, w_in), w_qkv)
            q = qkv[:, :self.q_size].view(steps, self.num_heads, self.head_dim).transpose(0, 1)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(
                steps, self.num_kv, self.head_dim).transpose(0, 1)
            v = qkv[:, self.q_size + self.kv_size:].view(
                steps, self.num_kv, self.head_dim).transpose(0, 1)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            cache.keys[index, :, start:end] = k
            cache.values[index, :, start:end] = v
            keys, values = cache.keys[index, :, :end], cache.values[index, :, :end]
            if steps == 1:
                # One query: grouped heads share their kv head; weights come out on the way.
                grouped = q.reshape(self.num_kv, self.group, self.head_dim)
                weights = torch.softmax(grouped @ keys.transpose(1, 2) * self.scale, dim=-1)
                out = (weights @ values).reshape(1, self.q_size)
                if rows is not None:
                    rows[index] = weights.reshape(self.num_heads, end)
            else:
                out = F.scaled_dot_product_attention(
                    q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                    is_causal=start == 0, enable_gqa=True,
                    attn_mask=None if start == 0 else self._prefix_mask(start, steps))
                out = out[0].transpose(0, 1).reshape(steps, self.q_size)
                if rows is not None:
                    # Only the last query's row: it sees every key, so no mask.
                    last = q[:, -1:].reshape(self.num_kv, self.group, self.head_dim)
                    rows[index] = torch.softmax(last @ keys.transpose(1, 2) * self.scale,
                                                dim=-1).reshape(self.num_heads, end)
            x = x + F.linear(out, w_o)
            # MLP block.
            gate, up = F.linear(self._norm(x, w_post), w_gate_up).split(self.intermediate, -1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        cache.length = end
        hidden = self._norm(x if all_logits else x[-1:], self.final_norm)
        return F.linear(hidden, self.lm_head), rows

    @staticmethod
    def _prefix_mask(start: int, steps: int) -> torch.Tensor:
        """Causal mask for ``steps`` new queries after ``start`` cached positions."""
        return torch.ones(steps, start + steps, dtype=torch.bool).tril(diagonal=start)
