"""A lean forward pass over a transformers Llama model's own weights.

transformers' generic forward spends most of a decode step in Python and bookkeeping (mask
building, cache objects, hooks): for this 135M model that is ~60 ms a token against a ~22 ms
memory floor. This runner does the same arithmetic, in float32 and in the same order, with:

- fused q/k/v and gate/up projections (the module weights become views into the fused
  tensors, so no memory is duplicated and the transformers path keeps working);
- a preallocated KV cache sized for the run (no growing concatenations);
- decode attention as two small matmuls per layer, which yields the attention weights for
  free: recording attention costs nothing extra, and prefill computes only the last row.

With packed weights (``packed.py``: a GGUF model's own Q4_1/Q8_0 blocks, bit for bit the
float32 weights) a decode step is one C call for the whole model (per layer: norm, q/k/v,
rotary, cache write, attention with its weights, MLP; then the final norm and the output head)
reading 97 MB instead of 538 (and up to four concurrent runs' steps are one call,
``decode_many``); short prefills use the packed matmul, long ones by default a float32
product (oneDNN's, see ``onednn_linear``) on one layer's weights rebuilt at a time
(``float32``, exact arithmetic), or by name 16-bit fixed-point activations times the Q4_1
blocks on VNNI (``fixed16``: probabilities ~1e-3 off float32's) or 8-bit activations and
bfloat16 attention products (``fast``: ~0.1 off), and prefill attention is a float32 C
kernel (``prefill_attention.c``, ~1.3x torch's fused one). The model's float32 layer weights
are then never read by the engine (nor fused), nor is its embedding table (token rows come
from the tied output head's blocks), so they stay unloaded pages of the mapped safetensors
file, and the pages loading read are handed back (``weight_block.release_pages``): the
server's resident memory drops rather than grows.

On a GPU the weights are the float32 tensors and each run's decode steps replay one captured
CUDA graph (``graphed_decode.py``): a single launch instead of ~1,000 kernel launches a token.

Only LlamaForCausalLM-shaped models (Llama, SmolLM2, Mistral without sliding window) use it;
others take the transformers path.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache, cached_property
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from sampler_core.engine import packed as packed_kernels
from sampler_core.engine.devices import cuda_graphs_enabled
from sampler_core.engine.graphed_decode import StaticDecode
from sampler_core.engine.packed import PackedLinear, PackedLlama
from sampler_core.engine.threads import kernel_on_torch_threads, one_thread
from sampler_core.engine.weight_block import release_pages

#: Up to this many new positions a forward reads the packed weights; a longer prefill is
#: compute-bound and runs a float32 product on weights rebuilt from the blocks per layer.
PACKED_MAX_STEPS = 32
#: The activations' bits in each fixed-point prefill mode.
FIXED_BITS = {"fixed16": 16, "fast": 8}
#: With graphed decode (a GPU) a run's cache holds a multiple of this many positions, so that
#: runs whose prompt and length round alike can take over a finished run's cache with its
#: captured steps (a capture costs ~30 ms on an H100) ...
GRAPHED_CAPACITY_STEP = 256
#: ... of which at most this many are kept (~46 KB a position each for the default model).
SPARE_CACHES = 4


@dataclass
class KVCache:
    """Keys and values of one run: ``[layer, kv_head, position, head_dim]``, filled to ``length``."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    #: On a GPU, this run's captured decode steps, keyed by whether they record attention.
    graphs: dict[bool, StaticDecode] = field(default_factory=dict)
    #: On the packed CPU path, the C decode step's hidden state and scratch, sized for the
    #: cache's capacity once per run (rather than allocated every step).
    decode_buffer: torch.Tensor | None = None


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


DenseProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FixedPointProduct:
    """A packed linear's long-prefill product with ``bits``-bit fixed-point activations
    (``PackedLinear.prefill``), which takes the RMSNorm or the MLP's SiLU before it and the
    residual sum after it into its own passes over the rows."""

    linear: PackedLinear
    bits: int

    def __call__(self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                 gated: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear.prefill(x, self.bits, norm=norm, eps=eps, gated=gated,
                                   residual=residual)


def _linear(x: torch.Tensor, weight: torch.Tensor | PackedLinear,
            dense: DenseProduct = F.linear) -> torch.Tensor:
    """``x @ weight.T`` for a float32 weight (by ``dense``) or a packed one (a fixed-point
    prefill's products go through ``FastLlama._normed_product`` and ``_plus_product``)."""
    return dense(x, weight) if isinstance(weight, torch.Tensor) else weight(x)


@cache
def onednn_linear() -> DenseProduct | None:
    """torch's own oneDNN float32 product (``mkldnn._linear_pointwise``, what torch.compile
    emits for a CPU linear), or None where this torch build lacks it or it fails a probe.

    Why not ``F.linear`` (MKL's sgemm): on this 2-core AVX-512 machine oneDNN multiplies the
    prefill's shapes (2,000 rows by 576 or 1,536) at 190-206 GFLOP/s against MKL's 130-165,
    and a single row 1.7x as fast. Still float32 throughout (relative error ~1e-6 against
    float64, MKL's ~4e-7), and each row's result is the same whatever the number of threads
    and the row count past one (checked by the tests), so runs stay bit for bit repeatable.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = op(torch.ones(2, 32), torch.ones(3, 32), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    if not torch.equal(probe, torch.full((2, 3), 32.0)):
        return None

    def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return op(x, weight, None, "none", [], "")

    return product


#: The row counts at which ``rows_agree`` compares a product's rows with a longer product's.
#: oneDNN picks its kernel by shape, and on some CPUs another one for a few rows: on an Intel
#: Xeon, torch 2.11's oneDNN 3.10 took ``gemm:jit`` up to 65 rows (32 for 1,536 inputs) and
#: ``brg_matmul`` past that, and their sums round differently (measured).
ROW_PROBE = (2, 3, 16, 33, 65, 100, 200)


def rows_agree(product: DenseProduct, shapes: Iterable[tuple[int, int]]) -> bool:
    """Whether ``product`` gives each row the same result whatever the number of rows (2 or
    more), probed on random weights of each ``(out_features, in_features)`` in ``shapes``:
    the first rows of a 256-row product against products of ``ROW_PROBE`` rows. A probe, not
    a proof; for the default model's four shapes it costs ~0.1 s once."""
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in sorted(set(shapes)):
        weight = torch.randn(out_features, in_features, generator=generator)
        x = torch.randn(256, in_features, generator=generator)
        full = product(x, weight)
        if not all(torch.equal(product(x[:rows], weight), full[:rows]) for rows in ROW_PROBE):
            return False
    return True


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

    def __init__(self, model: Any, packed: PackedLlama | None = None) -> None:
        config = model.config
        #: The same weights kept as GGUF blocks, for decode steps (``packed.py``); or None.
        self.packed = packed
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
        self.hidden = config.hidden_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv * self.head_dim
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if packed is None:
                qkv, gate_up = (_fuse(attn, ("q_proj", "k_proj", "v_proj")),
                                _fuse(mlp, ("gate_proj", "up_proj")))
            else:
                # Never read: the packed blocks stand in. Left unfused, the model's own float32
                # weights stay untouched pages of the mapped safetensors file, not memory.
                qkv = gate_up = None
            self.layers.append((
                layer.input_layernorm.weight, qkv, attn.o_proj.weight,
                layer.post_attention_layernorm.weight, gate_up, mlp.down_proj.weight,
            ))
        self.intermediate = config.intermediate_size
        self._cos = self._sin = torch.empty(0, self.head_dim)
        #: Whether decode steps replay a captured CUDA graph (on a GPU, unless
        #: ``$PROMPT_IDE_CUDA_GRAPHS=0``); the bench switches it to compare.
        self.cuda_graphs = self.embed.device.type == "cuda" and cuda_graphs_enabled()
        #: Finished runs' caches with their captured steps, oldest first (``new_cache``).
        self._spare_caches: list[tuple[int, torch.Tensor, torch.Tensor,
                                       dict[bool, StaticDecode]]] = []
        self._spare_lock = threading.Lock()  # runs start and end on several threads
        #: The compiled kernel (looked up once: ``kernel()`` takes a lock), or None.
        self._kernel = packed_kernels.kernel() if packed is not None else None
        if self._kernel is None:
            self.packed = None
        #: A tied embedding's packed blocks (the output head's), which give the rows of token
        #: ids bit for bit without reading the float32 table: that table is a mapped file, and
        #: each page read maps a whole page-cache folio into the process (up to 2 MB on
        #: Linux 6.x), so a few dozen token rows had made ~16 MB of it resident. Else None.
        self._packed_embed = (self.packed.lm_head
                              if self.packed is not None
                              and self.embed.data_ptr() == self.lm_head.data_ptr()
                              and self.embed.shape == self.lm_head.shape else None)
        #: How long prefills run (``packed.PREFILL_MODES``): float32
        #: (``packed.DEFAULT_PREFILL``) unless ``$PROMPT_IDE_PREFILL`` names another this runner
        #: and CPU can run.
        self.prefill_mode = "float32"
        #: Whether prefill attention runs in the kernel (float32, ~1.3x torch's fused one).
        self._prefill_attention = False
        #: Whether float32 weights on the CPU multiply through oneDNN (``onednn_linear``,
        #: where this torch has it) rather than ``F.linear``; the benches switch it to compare.
        #: Looked up at the first use, not here: oneDNN's first call costs ~3.5 MB of resident
        #: memory, which a server that only ever sees short prompts need not pay.
        self.onednn_linears = self.embed.device.type == "cpu"
        if self.packed is not None:
            # The mode named (float32 by default) where this CPU and model run it; else float32.
            try:
                self.set_prefill(kernel_attention=self.kernel_attention_available,
                                 mode=packed_kernels.prefill_mode())
            except ValueError:
                self.set_prefill(kernel_attention=self.kernel_attention_available,
                                 mode="float32")
            # One layer's float32 weights for long float32 prefills, reused layer after layer
            # (forwards of one model run one at a time: the engine's step lock).
            self._unpacked = [torch.empty(p.out_features, p.in_features)
                              for p in self.packed.layers[0]]
            # Longer contexts decode through the loop below (packed matmuls, torch attention).
            self._decode_max_context = self._kernel.decode_max_context()
            # decode_many's scratch, grown as needed (forwards run one at a time).
            self._batch_scratch = torch.empty(0)
            # What the C decode step reads; it points into tensors this runner keeps.
            self._decode_model = packed_kernels.decode_struct(
                self.packed, norms_in=[layer[0] for layer in self.layers],
                norms_post=[layer[3] for layer in self.layers], norm_final=self.final_norm,
                heads=self.num_heads, kv_heads=self.num_kv, head_dim=self.head_dim, eps=self.eps)
            # The float32 weights the blocks stand in for are never read here, yet loading read
            # the first page of each (safetensors), or every page (the packing's check on a
            # first load), and each read left a page-cache folio mapped in this process.
            release_pages(self._unread_weights())

    def _unread_weights(self) -> list[torch.Tensor]:
        """The model's float32 weights that the packed path never reads: every layer's linears
        and, where the packed output head gives its rows (``_packed_embed``), the embedding."""
        parts = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                 ("mlp", ("gate_proj", "up_proj", "down_proj")))
        linears = [getattr(getattr(layer, block), name).weight
                   for layer in self.model.model.layers for block, names in parts
                   for name in names]
        return linears + ([self.embed] if self._packed_embed is not None else [])

    @property
    def kernel_attention_available(self) -> bool:
        """Whether prefill attention can run in the kernel (packed weights, a fitting head)."""
        return (self.packed is not None and self.head_dim % 16 == 0
                and self.head_dim <= self._kernel.prefill_attention_max_dim())

    @property
    def dense_product(self) -> DenseProduct:
        """How float32 weights multiply now: oneDNN's product or ``F.linear``."""
        product = onednn_linear() if self.onednn_linears else None
        return F.linear if product is None else product

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The product chosen when a float32 weight is multiplied, not before (see
        # ``onednn_linears``).
        return self.dense_product(x, weight)

    def tails_match_whole_prefills(self, mode: str) -> bool:
        """Whether a prompt's tail run with ``as_long_prefill`` after positions kept from an
        earlier long prefill of its head (in ``mode``) computes bit for bit what a long
        prefill of the whole prompt would: true where every step of a long prefill gives each
        position the same result whatever rows it runs with. The kernel's attention walks
        keys in steps fixed by position and the norms are row-wise; in the fixed-point modes
        each row is rounded and multiplied on its own; in float32 the linears are oneDNN's
        product, where this CPU's oneDNN passes the probe ``rows_agree`` (all three modes
        tested)."""
        if self.packed is None or not self._prefill_attention:
            return False
        return mode in FIXED_BITS or (mode == "float32" and self.onednn_linears
                                      and self._onednn_rows_agree)

    @cached_property
    def _onednn_rows_agree(self) -> bool:
        """``rows_agree`` for oneDNN's product on this model's layer shapes (probed once, at
        the first float32 prompt that could run in pieces)."""
        product = onednn_linear()
        return product is not None and rows_agree(
            product, [(p.out_features, p.in_features) for p in self.packed.layers[0]])

    @property
    def prefill_attention_kernel(self) -> bool:
        """Whether long prefills' attention runs in the kernel now (else torch's)."""
        return self._prefill_attention

    def set_prefill(self, *, kernel_attention: bool, mode: str) -> None:
        """Choose how long prefills run: attention by the kernel or by torch, and the linears'
        ``mode`` (``packed.PREFILL_MODES``). For benchmarks and tests that compare the ways;
        the engine picks the default (``PROMPT_IDE_PREFILL``) when it loads."""
        self._check_mode("mode", mode, kernel_attention)
        if kernel_attention and not self.kernel_attention_available:
            raise ValueError(f"kernel_attention needs packed weights and a head_dim that is a "
                             f"multiple of 16 up to the kernel's limit, got {self.head_dim}")
        self._prefill_attention, self.prefill_mode = kernel_attention, mode

    def check_prefill(self, mode: str) -> None:
        """Refuse (ValueError naming ``prefill``) a prefill mode this runner cannot run."""
        self._check_mode("prefill", mode, self._prefill_attention)

    def _check_mode(self, name: str, mode: str, kernel_attention: bool) -> None:
        if mode not in packed_kernels.PREFILL_MODES:
            raise ValueError(f"{name} must be one of {', '.join(packed_kernels.PREFILL_MODES)}, "
                             f"got {mode!r}")
        where = "on a GPU" if self.embed.device.type != "cpu" else "here"
        if mode != "float32" and (self.packed is None or not self._kernel.prefill_supported()):
            raise ValueError(f"{name} {mode!r} needs packed weights on a CPU with AVX-512 VNNI, "
                             f"which this engine does not have {where}; use float32")
        if mode != "float32" and any(p.kind != 0 for layer in self.packed.layers for p in layer):
            raise ValueError(f"{name} {mode!r} needs Q4_1 layer weights, and this model's GGUF "
                             "file has others (Q8_0); use float32")
        if mode == "fast" and not (kernel_attention
                                   and self._kernel.prefill_attention_bf16_supported()):
            raise ValueError(f"{name} 'fast' needs the attention kernel and a CPU with AVX-512 "
                             "BF16; use float32 or fixed16")

    @property
    def weights(self) -> str:
        """What decode steps read: ``packed`` GGUF blocks or ``float32`` tensors."""
        return "packed" if self.packed is not None else "float32"

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for up to ``capacity`` positions. With graphed decode, room for
        ``capacity`` rounded up to ``GRAPHED_CAPACITY_STEP``, taken over from a finished run
        with its captured steps where one of that size is spare (it goes back when the run's
        cache is dropped)."""
        device = self.embed.device  # the cache follows the model's device
        if self.cuda_graphs:
            capacity = -(-capacity // GRAPHED_CAPACITY_STEP) * GRAPHED_CAPACITY_STEP
        shape = (self.num_layers, self.num_kv, capacity, self.head_dim)
        if not self.cuda_graphs:
            # Zeroed on a GPU: a graphed step attends over the whole capacity.
            make = torch.zeros if device.type == "cuda" else torch.empty
            return KVCache(make(shape, device=device), make(shape, device=device))
        with self._spare_lock:
            found = next((n for n in reversed(range(len(self._spare_caches)))  # the newest
                          if self._spare_caches[n][0] == capacity), None)
            spare = None if found is None else self._spare_caches.pop(found)
        if spare is None:
            keys, values = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
            graphs: dict[bool, StaticDecode] = {}
        else:
            # Zeroed again: the graphed step weighs the positions past the run's by exactly 0,
            # and 0 * a stale NaN would be NaN.
            _, keys, values, graphs = spare
            keys.zero_()
            values.zero_()
        cache = KVCache(keys, values, graphs=graphs)
        # The tensors and steps, not the cache, go back once the run drops the cache.
        weakref.finalize(cache, self._keep_spare, capacity, keys, values, graphs).atexit = False
        return cache

    def _keep_spare(self, capacity: int, keys: torch.Tensor, values: torch.Tensor,
                    graphs: dict[bool, StaticDecode]) -> None:
        """Keep a finished run's cache and captured steps for a later run (the oldest spare
        one is let go past ``SPARE_CACHES``)."""
        with self._spare_lock:
            self._spare_caches.append((capacity, keys, values, graphs))
            del self._spare_caches[:-SPARE_CACHES]

    def _rotary(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[end - start, head_dim]`` from a table grown as positions are reached.

        The rotary module computes each position independently (an outer product, then cos
        and sin), so a row of the table equals what a call for that position alone returns.
        """
        if end > self._cos.shape[0]:
            size = max(end, 2 * self._cos.shape[0], 256)
            positions = torch.arange(size, device=self.embed.device).unsqueeze(0)
            cos, sin = self.rotary(torch.empty(1, 1, device=self.embed.device), positions)
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        return self._cos[start:end], self._sin[start:end]

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
                attention: bool = False, prefill: str | None = None,
                as_long_prefill: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``T`` new positions (ids ``[T]`` or embeddings ``[T, hidden]``); ``prefill``
        overrides ``prefill_mode`` for this call (checked by ``check_prefill``);
        ``as_long_prefill`` runs even a few positions (at least 2) the way a long prefill runs
        (see ``tails_match_whole_prefills``).

        Returns logits (``[T, vocab]`` or ``[1, vocab]``) and, when asked, the attention of the
        last position: ``[layer, head, context]``.
        """
        if as_long_prefill and not (self.packed is not None and len(
                input_ids if inputs_embeds is None else inputs_embeds) >= 2):
            raise ValueError("as_long_prefill needs packed weights and at least 2 positions")
        if self.cuda_graphs and inputs_embeds is None and input_ids.shape[0] == 1:
            return self._decode_graphed(input_ids, cache, attention)
        x = self._embed_rows(input_ids) if inputs_embeds is None else inputs_embeds.float()
        steps, start = x.shape[0], cache.length
        end = start + steps
        rows = (torch.empty(self.num_layers, self.num_heads, end, device=x.device)
                if attention else None)
        if steps == 1 and self.packed is not None and end <= self._decode_max_context:
            return self._decode_packed(cache, rows, x=x), rows
        cos, sin = self._rotary(start, end)  # [T, head_dim]
        # Inexact modes apply to long prefills only; short ones read the packed blocks exactly.
        long = steps > PACKED_MAX_STEPS or as_long_prefill
        mode = (prefill or self.prefill_mode) if long else "float32"
        # After each parallel op torch's OpenMP worker spins for a while on a core the kernel's
        # threads need. A fixed-point prefill multiplies and attends on the kernel's threads
        # alone, so torch's few ops in it (norms, sums) run on this thread (fixed16: 11% of a
        # 2,000-token prefill, alternating runs in one process). A float32 one needs torch's
        # threads for oneDNN's products, so the kernel's jobs run on them too (11%).
        with (one_thread() if mode in FIXED_BITS
              else kernel_on_torch_threads(self._kernel) if self.packed is not None and long
              else nullcontext()):
            x = self._layers(x, cache, start, cos, sin, long, mode, all_logits, rows)
        cache.length = end
        hidden = self._norm(x if all_logits else x[-1:], self.final_norm)
        head = (self.packed.lm_head if self.packed is not None and hidden.shape[0] <= PACKED_MAX_STEPS
                else self.lm_head)
        return _linear(hidden, head, self._dense), rows

    def _embed_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings ``[T, hidden]`` of ids ``[T]``: from a tied embedding's packed blocks
        where there are some (``_packed_embed``), else from the table."""
        if self._packed_embed is None:
            return self.embed[input_ids]
        return self._packed_embed.rows(input_ids)

    def _embed_into(self, token_ids: Sequence[int], address: int) -> None:
        """The embeddings of checked ``token_ids``, one row after another, written at
        ``address`` (a decode step's input, which the kernel reads)."""
        if self._packed_embed is not None:
            ids = (ctypes.c_int64 * len(token_ids))(*token_ids)
            self._packed_embed.rows_to(ctypes.addressof(ids), len(token_ids), address)
            return
        row_bytes = self.hidden * self.embed.element_size()
        for n, token_id in enumerate(token_ids):
            ctypes.memmove(address + n * row_bytes, self.embed.data_ptr() + token_id * row_bytes,
                           row_bytes)

    def _layers(self, x: torch.Tensor, cache: KVCache, start: int, cos: torch.Tensor,
                sin: torch.Tensor, long: bool, mode: str, all_logits: bool,
                rows: torch.Tensor | None) -> torch.Tensor:
        """Every layer on the new positions ``x`` (``[T, hidden]``, from ``start``): their keys
        and values into the cache, the last position's attention into ``rows`` when given.
        Returns the hidden states (only the last position's when the last layer needs no
        more)."""
        steps = x.shape[0]
        end = start + steps
        dense = self._dense
        for index, (w_in, w_qkv, w_o, w_post, w_gate_up, w_down) in enumerate(self.layers):
            # Past the last layer's keys and values only the last position is read (unless
            # every position's logits are): the rest of that layer runs on its row alone.
            last_row_only = index == self.num_layers - 1 and steps > 1 and not all_logits
            if self.packed is not None:
                w_qkv, w_o, w_gate_up, w_down = self._packed_weights(index, long, mode,
                                                                     last_row_only)
            # Attention block: q/k/v, rotary, cache write, attention (and the last row's weights).
            qkv = self._normed_product(x, w_in, w_qkv, dense)
            if last_row_only:
                q = (self._split_heads_kernel if self._prefill_attention
                     else self._split_heads)(qkv, cache, index, start, cos, sin)
                q, x = q[:, -1:].contiguous(), x[-1:]
                out = self._attention(q, cache, index, end - 1, rows)
            elif steps > 1 and self._prefill_attention:
                q = self._split_heads_kernel(qkv, cache, index, start, cos, sin)
                out = self._attention_kernel(q, cache, index, start, steps, mode == "fast")
            else:
                q = self._split_heads(qkv, cache, index, start, cos, sin)
                out = self._attention(q, cache, index, start, rows)
            if rows is not None and steps > 1 and not last_row_only:
                # Only the last query's row: it sees every key, so no mask.
                last = q[:, -1:].reshape(self.num_kv, self.group, self.head_dim)
                rows[index] = torch.softmax(last @ cache.keys[index, :, :end].transpose(1, 2)
                                            * self.scale, dim=-1).reshape(self.num_heads, end)
            x = self._plus_product(x, out, w_o, dense)
            # MLP block.
            gate_up = self._normed_product(x, w_post, w_gate_up, dense)
            x = self._plus_product(x, gate_up, w_down, dense, gated=True)
        return x

    def _normed_product(self, x: torch.Tensor, norm: torch.Tensor, weight: Any,
                        dense: DenseProduct) -> torch.Tensor:
        """The RMSNorm of ``x`` times ``weight``; a fixed-point product normalises the rows as
        it rounds them (one pass less)."""
        if isinstance(weight, FixedPointProduct):
            return weight(x, norm=norm, eps=self.eps)
        return _linear(self._norm(x, norm), weight, dense)

    def _plus_product(self, x: torch.Tensor, a: torch.Tensor, weight: Any,
                      dense: DenseProduct, gated: bool = False) -> torch.Tensor:
        """``x + a @ weight.T``, or with ``gated`` ``x + (silu(gate) * up) @ weight.T`` for
        ``a`` the rows of ``[gate | up]``; a fixed-point product computes the SiLU as it rounds
        and adds ``x`` as it stores (bit for bit the same values and sum)."""
        if isinstance(weight, FixedPointProduct):
            return weight(a, gated=gated, residual=x)
        return x + _linear(self._silu_times(a) if gated else a, weight, dense)

    def _packed_weights(self, layer: int, long: bool, mode: str, last_row_only: bool
                        ) -> list[Any]:
        """What layer ``layer``'s four linears multiply by in a forward (with
        ``last_row_only``, all but q/k/v take the last position's row alone).

        Few rows: the packed blocks, which the kernel reads. Many (``long``): compute-bound, so
        a float32 product on the layer's weights rebuilt in float32 (bit for bit the same,
        reusing one layer's buffers), or, for an inexact ``mode``, fixed-point activations on
        VNNI."""
        parts = list(self.packed.layers[layer])
        if not long:
            return parts
        wide, one_row = (parts[:1], parts[1:]) if last_row_only else (parts, [])
        rebuilt = ([FixedPointProduct(p, FIXED_BITS[mode]) for p in wide]
                   if mode in FIXED_BITS
                   else [p.unpack(out) for p, out in zip(wide, self._unpacked)])
        return rebuilt + one_row

    def _split_heads(self, qkv: torch.Tensor, cache: KVCache, layer: int, start: int,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries ``[head, T, head_dim]``, rotated; the rotated keys and the values go into the
        cache at ``start``. cos and sin: ``[T, head_dim]``."""
        steps = qkv.shape[0]
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # broadcast over heads
        q = qkv[:, :self.q_size].view(steps, self.num_heads, self.head_dim).transpose(0, 1)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(
            steps, self.num_kv, self.head_dim).transpose(0, 1)
        v = qkv[:, self.q_size + self.kv_size:].view(
            steps, self.num_kv, self.head_dim).transpose(0, 1)
        cache.keys[layer, :, start:start + steps] = self._rope(k, cos, sin)
        cache.values[layer, :, start:start + steps] = v
        return self._rope(q, cos, sin)

    def _split_heads_kernel(self, qkv: torch.Tensor, cache: KVCache, layer: int, start: int,
                            cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The same in one C pass (``prefill_ops.c``); the queries come out contiguous, as the
        attention kernel reads them."""
        steps = qkv.shape[0]
        q = torch.empty(self.num_heads, steps, self.head_dim)
        self._kernel.prefill_split_heads(
            qkv.contiguous().data_ptr(), steps, self.num_heads, self.num_kv, self.head_dim,
            cos.data_ptr(), sin.data_ptr(), q.data_ptr(), cache.keys[layer].data_ptr(),
            cache.values[layer].data_ptr(), cache.keys.shape[2], start)
        return q

    def _attention(self, q: torch.Tensor, cache: KVCache, layer: int, start: int,
                   rows: torch.Tensor | None) -> torch.Tensor:
        """Attention of the new queries by torch, ``[T, heads * head_dim]``; a single query's
        weights go into ``rows`` on the way."""
        steps = q.shape[1]
        end = start + steps
        keys, values = cache.keys[layer, :, :end], cache.values[layer, :, :end]
        if steps > 1:
            return self._attention_sdpa(q, keys, values, start, steps)
        # One query: grouped heads share their kv head; weights come out on the way.
        grouped = q.reshape(self.num_kv, self.group, self.head_dim)
        weights = torch.softmax(grouped @ keys.transpose(1, 2) * self.scale, dim=-1)
        if rows is not None:
            rows[layer] = weights.reshape(self.num_heads, end)
        return (weights @ values).reshape(1, self.q_size)

    def _silu_times(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for rows of ``[gate | up]``: in C with the kernel, else torch."""
        if self._kernel is None:
            gate, up = gate_up.split(self.intermediate, -1)
            return F.silu(gate) * up
        act = torch.empty(gate_up.shape[0], self.intermediate)
        self._kernel.prefill_silu_times(gate_up.contiguous().data_ptr(), gate_up.shape[0],
                                        self.intermediate, act.data_ptr())
        return act

    def _attention_kernel(self, q: torch.Tensor, cache: KVCache, layer: int, start: int,
                          steps: int, bf16: bool) -> torch.Tensor:
        """Causal attention of ``steps`` new queries (``[head, T, head_dim]``, contiguous) over
        the cache, by the kernel (``prefill_attention.c``; its products in bfloat16 when
        ``bf16``); returns ``[T, heads * head_dim]``."""
        end = start + steps
        out = torch.empty(steps, self.q_size)
        scratch = torch.empty(self._kernel.prefill_attention_scratch_floats(
            self.num_heads, self.num_kv, self.head_dim, start, steps, int(bf16)))
        self._kernel.prefill_attention(
            q.data_ptr(), cache.keys[layer].data_ptr(), cache.values[layer].data_ptr(),
            cache.keys.shape[2], self.num_heads, self.num_kv, self.head_dim, start, steps,
            self.scale, out.data_ptr(), scratch.data_ptr(), bf16)
        return out

    def _attention_sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        start: int, steps: int) -> torch.Tensor:
        """The same by torch's fused attention (``[T, heads * head_dim]``)."""
        # Contiguous queries and each kv head repeated for its query heads: the fused kernel
        # runs ~20% faster on these than on strided views with enable_gqa.
        out = F.scaled_dot_product_attention(
            q.contiguous().unsqueeze(0),
            keys.repeat_interleave(self.group, 0).unsqueeze(0),
            values.repeat_interleave(self.group, 0).unsqueeze(0), is_causal=start == 0,
            attn_mask=None if start == 0 else self._prefix_mask(start, steps, q.device))
        return out[0].transpose(0, 1).reshape(steps, self.q_size)

    @property
    def max_batch(self) -> int:
        """How many runs' decode steps ``decode_many`` takes at once (1 without the kernel)."""
        return self._kernel.decode_max_seqs() if self.packed is not None else 1

    def steps_in_kernel(self, cache: KVCache) -> bool:
        """Whether a decode step on ``cache`` is one C call on the packed weights (``decode``'s
        leanest path, which ``decode_many`` shares between runs): the packed CPU path, within
        the kernel's context limit."""
        return (self.packed is not None and not self.cuda_graphs
                and self.embed.dtype == torch.float32 and self.embed.is_contiguous()
                and cache.length + 1 <= self._decode_max_context)

    def step_is_queued(self, cache: KVCache, attention: bool) -> bool:
        """Whether ``decode`` on ``cache`` only queues the step on the GPU and returns: it
        replays the run's captured graph (the capture itself, on a run's first step, waits)."""
        return self.cuda_graphs and attention in cache.graphs

    def _check_token(self, token_id: int) -> None:
        """Refuse an id outside the vocabulary (its embedding row would be read out of bounds)."""
        if not 0 <= token_id < self.embed.shape[0]:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{self.embed.shape[0] - 1})")

    def decode_many(self, steps: Sequence[tuple[int, KVCache, bool]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Several runs' decode steps, ``(token id, cache, attention)`` each (every cache
        ``steps_in_kernel``, at most ``max_batch``), in one C call that reads the weights once for
        all; each gets bit for bit what ``decode`` gives it alone: logits ``[1, vocab]`` and,
        when asked, attention rows ``[layer, head, context]``."""
        if not 1 <= len(steps) <= self.max_batch:
            raise ValueError(f"decode_many takes 1 to {self.max_batch} steps, got {len(steps)}")
        if len(steps) == 1:  # alone: the leanest call (its buffers kept in the run's cache)
            token_id, cache, attention = steps[0]
            return [self.decode(token_id, cache, attention=attention)]
        lib, count = self._kernel, len(steps)
        lib.pool_threads(torch.get_num_threads())  # as many as torch uses, if changed since
        starts = [self._next_position(cache) for _, cache, _ in steps]
        self._rotary_pointers(max(starts))  # grow the tables first: then no pointer moves
        x = torch.empty(count, self.hidden)
        seqs = (packed_kernels.DecodeSeqStruct * count)()
        rows: list[torch.Tensor | None] = []
        for token_id, _, _ in steps:
            self._check_token(token_id)
        self._embed_into([token_id for token_id, _, _ in steps], x.data_ptr())
        for n, ((_, cache, attention), start) in enumerate(zip(steps, starts)):
            rows.append(torch.empty(self.num_layers, self.num_heads, start + 1)
                        if attention else None)
            cos, sin = self._rotary_pointers(start)
            seqs[n] = packed_kernels.DecodeSeqStruct(
                cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape[2], start, cos,
                sin, None if rows[n] is None else rows[n].data_ptr())
        model = ctypes.byref(self._decode_model)
        floats = lib.decode_batch_scratch_floats(model, count, max(starts) + 1)
        if self._batch_scratch.numel() < floats:  # reused step after step (one at a time)
            self._batch_scratch = torch.empty(floats)
        logits = torch.empty(count, self._decode_model.vocab)
        lib.decode_batch(model, count, seqs, x.data_ptr(), self._batch_scratch.data_ptr(),
                         logits.data_ptr())
        for _, cache, _ in steps:
            cache.length += 1
        return [(logits[n:n + 1], rows[n]) for n in range(count)]

    def decode(self, token_id: int, cache: KVCache, *, attention: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One new token: ``forward`` on ``[token_id]``, with the least Python around the C step
        on the packed path (the tensor of ids, the embedding lookup, the copies and the
        allocations around it had cost ~0.35 ms a token against its ~5.5 ms)."""
        if self.cuda_graphs:  # the id goes in by a fill: no copy from the host that waits
            self._check_token(token_id)
            return self._decode_graphed(token_id, cache, attention)
        if not self.steps_in_kernel(cache):
            return self.forward(torch.tensor([token_id], device=self.embed.device), cache,
                                attention=attention)
        self._check_token(token_id)
        rows = (torch.empty(self.num_layers, self.num_heads, cache.length + 1)
                if attention else None)
        return self._decode_packed(cache, rows, token_id=token_id), rows

    def _decode_packed(self, cache: KVCache, rows: torch.Tensor | None, *,
                       token_id: int | None = None, x: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """One new position (a token's embedding, or ``x`` ``[1, hidden]``) through the whole
        model in one C call; returns logits ``[1, vocab]``.

        The same arithmetic as the loop in ``forward`` (per layer: norm, q/k/v, rotary, cache
        write, attention with its weights into ``rows``, output, MLP; then the final norm and
        the output head), without a Python round trip per layer.
        """
        lib = self._kernel
        lib.pool_threads(torch.get_num_threads())  # as many as torch uses, if changed since
        start, capacity = self._next_position(cache), cache.keys.shape[2]
        model = ctypes.byref(self._decode_model)
        if cache.decode_buffer is None:  # the hidden state (updated in place), then scratch
            cache.decode_buffer = torch.empty(
                self.hidden + lib.decode_scratch_floats(model, capacity))
        state = cache.decode_buffer.data_ptr()
        row_bytes = self.hidden * self.embed.element_size()
        if x is None:
            self._embed_into([token_id], state)
        else:
            cache.decode_buffer[:self.hidden].copy_(x[0])
        cos, sin = self._rotary_pointers(start)
        logits = torch.empty(1, self._decode_model.vocab)
        lib.decode_step(model, state, cos, sin, cache.keys.data_ptr(), cache.values.data_ptr(),
                        capacity, start, None if rows is None else rows.data_ptr(),
                        state + row_bytes, logits.data_ptr())
        cache.length = start + 1
        return logits

    def _rotary_pointers(self, position: int) -> tuple[int, int]:
        """Addresses of the cos and sin rows of ``position`` in the (grown if need be) tables."""
        if position >= self._cos.shape[0]:
            self._rotary(position, position + 1)
        offset = position * self.head_dim * self._cos.element_size()
        return self._cos.data_ptr() + offset, self._sin.data_ptr() + offset

    @staticmethod
    def _next_position(cache: KVCache) -> int:
        """Where a decode step writes: the cache's length, refused when the cache is full."""
        start, capacity = cache.length, cache.keys.shape[2]
        if start >= capacity:
            raise ValueError(f"the KV cache holds {capacity} positions; position {start} is past it")
        return start

    def _decode_graphed(self, token: torch.Tensor | int, cache: KVCache, attention: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One new position by replaying this run's captured CUDA graph (captured on its first
        decode step); returns copies, as the next replay overwrites the graph's outputs. Only
        queued on the GPU: the host goes on until it reads them."""
        start = self._next_position(cache)
        static = cache.graphs.get(attention)
        if static is None:
            static = cache.graphs[attention] = StaticDecode(self, cache, attention)
        logits, rows = static.run(token, start)
        cache.length = start + 1
        return logits.clone(), None if rows is None else rows.clone()

    @staticmethod
    def _prefix_mask(start: int, steps: int, device: torch.device) -> torch.Tensor:
        """Causal mask for ``steps`` new queries after ``start`` cached positions."""
        return torch.ones(steps, start + steps, dtype=torch.bool, device=device).tril(
            diagonal=start)
