"""Attention rows computed only where a view needs them.

Asking a transformers model for ``output_attentions`` switches it to eager attention and
materialises every layer's full ``N x N`` map (5.8 GB for a 2,000-token prompt here). We only
ever need the row of the *last* query position (the one whose logits pick the next token), so
we register an attention function that runs fast sdpa for the output and, while a recorder is
armed, also computes that one row per head: ``softmax(q_last . K^T * scale)``. Cost per layer:
heads x context, against heads x context x context for the full map.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTENTION_IMPLEMENTATION = "prompt_ide_rows"


class AttentionRecorder:
    """Collects the last query row of every layer's attention while armed.

    One recorder per model; the engine arms it around a forward pass while holding the model's
    step lock, so rows of concurrent runs never mix.
    """

    def __init__(self) -> None:
        self.armed = False
        self.rows: dict[int, torch.Tensor] = {}

    def arm(self) -> None:
        self.rows = {}
        self.armed = True

    def take(self, num_layers: int) -> torch.Tensor:
        """Stop recording; return ``[layer, head, context]`` float32 rows."""
        self.armed = False
        rows = [self.rows[i] for i in range(num_layers)]
        self.rows = {}
        return torch.stack(rows)


_recorders: dict[int, AttentionRecorder] = {}
_recorders_lock = threading.Lock()


def recorder_for(config: Any) -> AttentionRecorder:
    """The recorder bound to a model's config (created on first use)."""
    with _recorders_lock:
        return _recorders.setdefault(id(config), AttentionRecorder())


def _rows_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    recorder = _recorders.get(id(module.config))
    if recorder is not None and recorder.armed:
        # query: [batch, heads, q_len, dim]; key: [batch, kv_heads, k_len, dim]. The last
        # query position sees every key (causal), so no mask is needed for its row.
        keys = repeat_kv(key, module.num_key_value_groups)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query[0, :, -1:, :].float() @ keys[0].float().transpose(-1, -2)) * scale
        recorder.rows[module.layer_idx] = torch.softmax(scores[:, 0, :], dim=-1)
    return out, None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _rows_attention)
