"""Weights kept packed as the GGUF file ships them, multiplied in float32.

The default model *is* its 4-bit weights: every linear layer is GGUF Q4_1 (blocks of 32 with
``w = d * q + m``, ``q`` in 0..15, ``d`` and ``m`` float16) and the tied embedding / output head
is Q8_0 (``w = d * q``, ``q`` int8). Dequantised to float32 these are exact, and that float32
model is our reference. A decode step is a matrix-vector product per layer, bound by memory
traffic: 538 MB a token in float32 against 97 MB packed.

torch's own int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) is fast only for bfloat16
activations, which change answers (float32 and bfloat16 greedy runs part within 128 tokens);
with float32 activations it takes a scalar path ~100x slower than float32 ``linear``. So this
module carries a small C kernel (AVX-512, compiled once with the system C compiler into the
model cache, loaded with ctypes) that, per 32-weight block, rebuilds each weight exactly as the
reference does (``fma(q, d, m)``: ``d * q`` is exact, so one rounding, bit for bit the float32
weight) and accumulates ``x * w`` in float32. Only the order of the sums differs from a float32
matmul, as it would between any two BLAS libraries. Rows are shared among as many threads as
torch uses (a small pool in the kernel, robust to a busy machine), each row summed by one
thread in a fixed order, so results do not depend on the thread count.

The blocks are stored rearranged (quants of a row together, its float16 scales together; see
``packed_kernel.c``) in a cache file beside the converted model, so the kernel widens a row's
scales sixteen at a time and rebuilds a Q4_1 block's 32 weights from a 16-entry table with two
lane permutes. ``decode_step`` runs one whole decode step (every layer, the final norm and the
output head) in one call; ``decode_batch`` runs up to four runs' steps in one, each on its own
cache, reading the weights once for all (``step_batcher.py`` gathers them). Long prefills take ``prefill_attention.c`` (float32 causal
attention), ``prefill_ops.c`` and, by default where the CPU has AVX-512 VNNI,
``prefill_kernel.c`` (16-bit fixed-point activations: the same greedy tokens as float32 and
probabilities within 1e-3 of it, as measured by bench/decode.py; 8-bit for ``fast``, asked
for by name).

Nothing here is used when the kernel cannot be built (no compiler, no AVX-512) or the weights
in the GGUF file do not reproduce the loaded model's bit for bit: the engine then runs float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# How a long prefill runs: ``float32`` (exact arithmetic: oneDNN's product on weights
# rebuilt a layer at a time, float32 attention; the default); ``fixed16`` (activations in
# 16-bit fixed point on VNNI, ``prefill_kernel.c``: probabilities ~1e-3 off float32's, past it
# on some prompts, so only by name); ``fast`` (8-bit activations and bfloat16 attention
# products: greedy runs part from float32's, so only by name). Per run
# ``SampleSettings.prefill``, for the engine ``$PROMPT_IDE_PREFILL``.
from sampler_core.settings import PREFILL_MODES

#: The engine's prefill mode unless ``$PROMPT_IDE_PREFILL`` names one (a mode this runner or
#: CPU cannot run falls back to float32). Not fixed16: on 47 400-token prompts its
#: probabilities came within 1.4e-3 of float32's, past the same-answers rule's 1e-3 on two
#: (``bench/decode.py`` measures five every run).
DEFAULT_PREFILL = "float32"

Q4_1_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles (32 weights)
Q8_0_BLOCK_BYTES = 34  # float16 d, 32 int8 weights
BLOCK = 32
#: The packed linears of one layer, in order.
LAYER_PARTS = ("qkv", "o", "gate_up", "down")
WEIGHT_MODES = ("packed", "float32")
#: The kernel's rotary step works on heads up to this size (a buffer on its stack).
MAX_HEAD_DIM = 512

#: The kernel's source files (beside this module), compiled together into one library.
SOURCE_NAMES = ("kernel_common.h", "packed_kernel.c", "prefill_kernel.c", "prefill_attention.c",
                "prefill_ops.c")
_SOURCES = tuple(Path(__file__).with_name(name) for name in SOURCE_NAMES)

_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mf16c", "-mfma", "-pthread", "-shared", "-fPIC"]
#: Added where the compiler has OpenMP: the built kernel then shares torch's OpenMP runtime
#: (``libgomp.so.1``, the same library once loaded) for ``pool_use_openmp``.
_OPENMP_FLAGS = ["-fopenmp"]

_lib: Any = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "f16c", "fma"))


def _build(target: Path, sources: tuple[Path, ...]) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or $CC) to build the packed-weight kernel")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".kernel-", dir=target.parent))
    try:
        for source in sources:
            (scratch / source.name).write_text(source.read_text())
        units = [str(scratch / s.name) for s in sources if s.suffix == ".c"]
        out = scratch / target.name
        for extra in (_OPENMP_FLAGS, []):  # without OpenMP where the compiler lacks it
            done = subprocess.run([compiler, *_FLAGS, *extra, *units, "-o", str(out), "-lm"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(f"building the packed-weight kernel failed: {done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each leave a whole file
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_kernel(sources: tuple[Path, ...] = _SOURCES) -> Any:
    """The library built from ``sources`` (a build cached under the models folder, keyed by
    their text), its functions typed; raises RuntimeError or OSError when it cannot be had.
    ``kernel()`` is this, once, for the engine; ``bench/sections.py`` loads instrumented
    copies."""
    if not _cpu_has_avx512():
        raise RuntimeError("this CPU lacks AVX-512 (the packed-weight kernel needs it)")
    from sampler_core.engine.models import cache_root

    text = "".join(s.read_text() for s in sources) + " ".join(_FLAGS + _OPENMP_FLAGS)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"packed-{key}.so"
    if not target.is_file():
        _build(target, sources)
    lib = ctypes.CDLL(str(target))
    lib.packed_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_void_p]
    lib.packed_matmul.restype = None
    lib.decode_step.argtypes = ([ctypes.POINTER(PackedModelStruct)]
                                + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2
                                + [ctypes.c_void_p] * 3)
    lib.decode_step.restype = None
    lib.decode_scratch_floats.argtypes = [ctypes.POINTER(PackedModelStruct), ctypes.c_int]
    lib.decode_scratch_floats.restype = ctypes.c_int
    if hasattr(lib, "decode_batch"):  # an earlier checkout's kernel (bench/sections.py) lacks it
        lib.decode_batch.argtypes = [ctypes.POINTER(PackedModelStruct), ctypes.c_int,
                                     ctypes.POINTER(DecodeSeqStruct), ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.decode_batch.restype = None
        lib.decode_batch_scratch_floats.argtypes = [ctypes.POINTER(PackedModelStruct),
                                                    ctypes.c_int, ctypes.c_int]
        lib.decode_batch_scratch_floats.restype = ctypes.c_size_t
        lib.decode_max_seqs.restype = ctypes.c_int
    lib.packed_dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.packed_dequantize.restype = None
    lib.packed_rows.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.packed_rows.restype = None
    lib.packed_max_in_features.restype = ctypes.c_int
    lib.decode_max_context.restype = ctypes.c_int
    lib.prefill_supported.restype = ctypes.c_int
    lib.prefill_scratch_bytes.argtypes = [ctypes.c_int] * 4
    lib.prefill_scratch_bytes.restype = ctypes.c_size_t
    lib.prefill_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_void_p]
    lib.prefill_matmul.restype = None
    lib.prefill_attention.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
                                      + [ctypes.c_float] + [ctypes.c_void_p] * 2
                                      + [ctypes.c_int])
    lib.prefill_attention.restype = None
    lib.prefill_attention_bf16_supported.restype = ctypes.c_int
    lib.prefill_attention_scratch_floats.argtypes = [ctypes.c_int] * 6
    lib.prefill_attention_scratch_floats.restype = ctypes.c_size_t
    lib.prefill_attention_max_dim.restype = ctypes.c_int
    lib.prefill_split_heads.argtypes = ([ctypes.c_void_p] + [ctypes.c_int] * 4
                                        + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2)
    lib.prefill_split_heads.restype = None
    lib.prefill_silu_times.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_void_p]
    lib.prefill_silu_times.restype = None
    if hasattr(lib, "pool_use_openmp"):  # an earlier checkout's kernel (bench/sections.py) lacks it
        lib.pool_use_openmp.argtypes = [ctypes.c_int]
        lib.pool_use_openmp.restype = ctypes.c_int
    lib.pool_threads.argtypes = [ctypes.c_int]
    lib.pool_threads(torch.get_num_threads())
    return lib


def kernel() -> Any:
    """The compiled kernel library (built on first use), or None with ``kernel_error()`` set."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        try:
            _lib = load_kernel()
        except (OSError, RuntimeError, AttributeError) as exc:
            _lib_error = str(exc)
        return _lib


def use_threads(threads: int) -> None:
    """Let the kernel use ``threads`` threads (the caller's included), as torch does."""
    if _lib is not None:
        _lib.pool_threads(threads)


def kernel_error() -> str | None:
    """Why the kernel is unavailable (None when it loaded or was not tried)."""
    return _lib_error


@dataclass
class PackedLinear:
    """A ``[out, in]`` linear weight kept quantised; ``layer(x)`` is ``x @ w.T`` in float32.

    The GGUF blocks rearranged for the kernel (see ``packed_kernel.c``): ``quants`` holds the
    4-bit (two a byte) or 8-bit values row by row, ``scales`` each block's float16 scale (and,
    for Q4_1, its minimum) side by side, so the kernel widens a row's scales in one go.
    """

    quants: torch.Tensor  # uint8 [out, in / 2] (Q4_1) or [out, in] (Q8_0)
    scales: torch.Tensor  # float16 [out, in / 32 * 2] (Q4_1: d, m) or [out, in / 32] (Q8_0: d)
    kind: int  # 0: Q4_1, 1: Q8_0
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        _lib.packed_matmul(self.kind, x.data_ptr(), rows, self.in_features,
                           self.quants.data_ptr(), self.scales.data_ptr(), self.out_features,
                           y.data_ptr())
        return y

    def prefill(self, x: torch.Tensor, bits: int = 16, *, norm: torch.Tensor | None = None,
                eps: float = 0.0, gated: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + norm(x) @ w.T`` with ``norm(x)`` rounded to ``bits`` (16 or 8) bit fixed
        point per block of 32 (``prefill_kernel.c``; the ``fixed16`` and ``fast`` prefill
        modes), Q4_1 only. 16 bits: ~1.6x BLAS's float32 rate on a long prefill, outputs
        within ~1e-4 of the largest; 8 bits: faster still, within ~1e-2. ``norm``: RMSNorm
        weights (``[in_features]``, with ``eps``) applied to each row as it is rounded;
        ``gated``: ``x`` is ``[rows, 2 * in_features]``, gate then up, and the product takes
        silu(gate) * up (bit for bit the kernel's ``silu_times``); ``residual``: ``[rows,
        out_features]`` added to the products as they are stored (bit for bit ``residual +
        prefill(x)``). Each saves a pass over the rows."""
        if self.kind != 0:
            raise ValueError(f"the fixed-point prefill takes Q4_1 weights, not kind {self.kind}")
        if bits not in (16, 8):
            raise ValueError(f"bits must be 16 or 8, got {bits!r}")
        x = x.contiguous()
        rows = x.shape[0]
        width = self.in_features * (2 if gated else 1)
        if x.shape[1:] != (width,):
            raise ValueError(f"x must have {width} columns{' (gate, then up)' if gated else ''}, "
                             f"got shape {tuple(x.shape)}")
        if norm is not None and norm.shape != (self.in_features,):
            raise ValueError(f"norm must have shape ({self.in_features},), got {tuple(norm.shape)}")
        if residual is not None:
            if residual.shape != (rows, self.out_features):
                raise ValueError(f"residual must have shape ({rows}, {self.out_features}), got "
                                 f"{tuple(residual.shape)}")
            residual = residual.contiguous()
        y = torch.empty(rows, self.out_features)
        scratch = torch.empty(_lib.prefill_scratch_bytes(rows, self.in_features,
                                                         self.out_features, bits),
                              dtype=torch.uint8)
        _lib.prefill_matmul(x.data_ptr(), rows, self.in_features, self.quants.data_ptr(),
                            self.scales.data_ptr(), self.out_features, y.data_ptr(),
                            scratch.data_ptr(), bits,
                            None if norm is None else norm.contiguous().data_ptr(), eps,
                            int(gated), None if residual is None else residual.data_ptr())
        return y

    def unpack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight, rebuilt by the kernel (for a long prefill, which is compute-bound
        and runs faster through BLAS on a transient float32 copy, one layer at a time)."""
        if out is None:
            out = torch.empty(self.out_features, self.in_features)
        _lib.packed_dequantize(self.kind, self.quants.data_ptr(), self.scales.data_ptr(),
                               self.out_features, self.in_features, out.data_ptr())
        return out

    def rows(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``ids`` (int64 ``[n]``) of the float32 weight ``[n, in_features]``, rebuilt by
        the kernel bit for bit; a tied embedding's rows for token ids. ``out``: a contiguous
        float32 ``[n, in_features]`` to write them into. Raises ValueError for an id past the
        rows."""
        ids = ids.to(torch.int64).contiguous()
        count = ids.numel()
        if count and not (0 <= int(ids.min()) and int(ids.max()) < self.out_features):
            raise ValueError(f"row ids must be in 0..{self.out_features - 1}, got "
                             f"{int(ids.min())}..{int(ids.max())}")
        if out is None:
            out = torch.empty(count, self.in_features)
        elif out.shape != (count, self.in_features) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({count}, {self.in_features}), got "
                             f"{tuple(out.shape)}")
        self.rows_to(ids.data_ptr(), count, out.data_ptr())
        return out

    def rows_to(self, ids_address: int, count: int, out_address: int) -> None:
        """``rows`` at raw addresses (``count`` int64 ids, each below ``out_features``; room for
        ``count * in_features`` floats): for a decode step, whose one row goes straight into
        the kernel's state."""
        _lib.packed_rows(self.kind, self.quants.data_ptr(), self.scales.data_ptr(),
                         self.in_features, ids_address, count, out_address)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the float32 weight (in numpy, independently of the kernel)."""
        quants = self.quants[start:stop].numpy()
        rows = quants.shape[0]
        scales = self.scales[start:stop].numpy().astype(np.float32).reshape(
            rows, -1, 2 if self.kind == 0 else 1)
        if self.kind == 0:
            qs = quants.reshape(rows, -1, 16)
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)
            w = scales[..., :1] * q + scales[..., 1:]
        else:
            w = quants.view(np.int8).reshape(rows, -1, 32).astype(np.float32) * scales
        return torch.from_numpy(w.reshape(rows, self.in_features))

    def equals(self, weight: torch.Tensor, chunk: int = 2048) -> bool:
        """Whether the blocks dequantise bit for bit to ``weight`` (checked a chunk at a time)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            return False
        return all(torch.equal(self.dequantize(start, start + chunk), weight[start:start + chunk])
                   for start in range(0, self.out_features, chunk))

    @property
    def nbytes(self) -> int:
        return self.quants.numel() + 2 * self.scales.numel()


def _unpermute_rows(blocks: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q/k, as transformers' GGUF loader does."""
    half = blocks.shape[0] // heads // 2
    return blocks.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(blocks.shape)


def _packed(tensor: Any, heads: int | None = None) -> PackedLinear:
    """A GGUF tensor's blocks, split into the kernel's quants and scales."""
    kind = {"Q4_1": 0, "Q8_0": 1}[tensor.tensor_type.name]
    blocks = np.asarray(tensor.data)
    if heads is not None:
        blocks = _unpermute_rows(blocks, heads)
    out_features = int(tensor.shape[1])
    in_features = int(tensor.shape[0])
    size = Q4_1_BLOCK_BYTES if kind == 0 else Q8_0_BLOCK_BYTES
    raw = blocks.reshape(out_features, -1, size)
    scale_bytes = 4 if kind == 0 else 2  # (d, m) or d, float16 each
    scales = raw[..., :scale_bytes].copy().view(np.float16)
    quants = np.ascontiguousarray(raw[..., scale_bytes:]).reshape(out_features, -1)
    return PackedLinear(torch.from_numpy(quants), torch.from_numpy(scales.reshape(out_features, -1)),
                        kind, out_features, in_features)


def _cat(parts: list[PackedLinear]) -> PackedLinear:
    return PackedLinear(torch.cat([p.quants for p in parts]).contiguous(),
                        torch.cat([p.scales for p in parts]).contiguous(), parts[0].kind,
                        sum(p.out_features for p in parts), parts[0].in_features)


class PackedWeightStruct(ctypes.Structure):
    """``packed_weight`` in packed_kernel.c."""

    _fields_ = [("q", ctypes.c_void_p), ("s", ctypes.c_void_p)]


class PackedModelStruct(ctypes.Structure):
    """``packed_model`` in packed_kernel.c: everything one decode step reads."""

    _fields_ = [("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("intermediate", ctypes.c_int), ("vocab", ctypes.c_int),
                ("head_kind", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("norm_in", ctypes.POINTER(ctypes.c_void_p)),
                ("norm_post", ctypes.POINTER(ctypes.c_void_p)),
                ("linears", ctypes.POINTER(PackedWeightStruct)),
                ("norm_final", ctypes.c_void_p), ("head", PackedWeightStruct)]


class DecodeSeqStruct(ctypes.Structure):
    """``decode_seq`` in packed_kernel.c: one sequence of a batched decode step."""

    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("capacity", ctypes.c_int), ("pos", ctypes.c_int),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("rows", ctypes.c_void_p)]


@dataclass
class PackedLlama:
    """Per layer ``(qkv, o, gate_up, down)`` packed linears, and the packed output head."""

    layers: list[tuple[PackedLinear, PackedLinear, PackedLinear, PackedLinear]]
    lm_head: PackedLinear

    @property
    def nbytes(self) -> int:
        return self.lm_head.nbytes + sum(w.nbytes for layer in self.layers for w in layer)


def load_packed(gguf_path: Path, model: Any) -> PackedLlama | None:
    """The model's linear weights from its GGUF file, kept packed; None if any does not match.

    A layer is kept packed only in the GGUF types the kernel knows (Q4_1 linears, a Q8_0
    head), and only when its blocks dequantise bit for bit to the loaded float32 weight (which
    also checks the row order of q and k).
    """
    import gguf

    if kernel() is None:
        return None
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    # GGUF name -> (module, attribute, heads whose rotary row order was permuted).
    names = {"attn_q": ("self_attn", "q_proj", heads), "attn_k": ("self_attn", "k_proj", kv_heads),
             "attn_v": ("self_attn", "v_proj", None), "attn_output": ("self_attn", "o_proj", None),
             "ffn_gate": ("mlp", "gate_proj", None), "ffn_up": ("mlp", "up_proj", None),
             "ffn_down": ("mlp", "down_proj", None)}
    supported = ("Q4_1", "Q8_0")

    def take(name: str, module_weight: torch.Tensor, rows_heads: int | None) -> PackedLinear | None:
        tensor = tensors.get(name)
        if tensor is None or tensor.tensor_type.name not in supported:
            return None
        packed = _packed(tensor, rows_heads)
        # The kernel widens a row's scales on its stack: rows up to its limit only.
        if (packed.in_features % BLOCK or packed.in_features > kernel().packed_max_in_features()
                or not packed.equals(module_weight)):
            return None
        return packed

    layers = []
    for index, layer in enumerate(model.model.layers):
        found: dict[str, PackedLinear] = {}
        for gguf_name, (module, attr, rows_heads) in names.items():
            weight = getattr(getattr(layer, module), attr).weight
            packed = take(f"blk.{index}.{gguf_name}.weight", weight, rows_heads)
            if packed is None:
                return None
            found[gguf_name] = packed
        layers.append((_cat([found["attn_q"], found["attn_k"], found["attn_v"]]),
                       found["attn_output"], _cat([found["ffn_gate"], found["ffn_up"]]),
                       found["ffn_down"]))
    head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    lm_head = take(head_name, model.lm_head.weight, None)
    if lm_head is None:
        return None
    return PackedLlama(layers, lm_head)


def decode_struct(packed: PackedLlama, *, norms_in: list[torch.Tensor],
                  norms_post: list[torch.Tensor], norm_final: torch.Tensor, heads: int,
                  kv_heads: int, head_dim: int, eps: float) -> PackedModelStruct:
    """The kernel's view of a model for ``decode_step``. It points into the given tensors,
    which must outlive it (a runner keeps both)."""
    layers = len(packed.layers)
    first = packed.layers[0]
    struct = PackedModelStruct(
        layers=layers, hidden=first[0].in_features, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=first[3].in_features, vocab=packed.lm_head.out_features,
        head_kind=packed.lm_head.kind, eps=eps, scale=head_dim ** -0.5)
    norm_in = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in norms_in))
    norm_post = (ctypes.c_void_p * layers)(*(t.data_ptr() for t in norms_post))
    linears = (PackedWeightStruct * (4 * layers))(*(
        PackedWeightStruct(w.quants.data_ptr(), w.scales.data_ptr())
        for layer in packed.layers for w in layer))
    struct.norm_in = ctypes.cast(norm_in, ctypes.POINTER(ctypes.c_void_p))
    struct.norm_post = ctypes.cast(norm_post, ctypes.POINTER(ctypes.c_void_p))
    struct.linears = ctypes.cast(linears, ctypes.POINTER(PackedWeightStruct))
    struct.norm_final = norm_final.data_ptr()
    struct.head = PackedWeightStruct(packed.lm_head.quants.data_ptr(),
                                     packed.lm_head.scales.data_ptr())
    struct.keep = (norm_in, norm_post, linears)  # the pointer arrays live as long as the struct
    return struct


def _cache_file(gguf_path: Path) -> Path:
    from sampler_core.engine.models import cache_root

    stat = gguf_path.stat()
    # The layout version (v3: quants and float16 scales apart) is part of the key.
    key = hashlib.sha256(
        f"v3:{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "packed" / f"{gguf_path.stem}-{key.hexdigest()[:16]}.safetensors"


def _save(packed: PackedLlama, target: Path) -> None:
    from safetensors.torch import save_file

    linears = {"lm_head": packed.lm_head}
    for index, layer in enumerate(packed.layers):
        linears.update({f"layers.{index}.{part}": w for part, w in zip(LAYER_PARTS, layer)})
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, linear in linears.items():
        tensors[f"{name}.quants"], tensors[f"{name}.scales"] = linear.quants, linear.scales
        shapes[name] = [linear.kind, linear.out_features, linear.in_features]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(scratch), metadata={"shapes": json.dumps(shapes)})
    os.replace(scratch, target)


def _load(source: Path) -> PackedLlama:
    """The cached blocks, in one block of memory on 2 MB pages (``weight_block.py``), laid
    out in the order a decode step reads them."""
    from sampler_core.engine.weight_block import read_header, read_into_block

    shapes = json.loads(read_header(source)[0]["__metadata__"]["shapes"])
    count = sum(1 for name in shapes if name.endswith(f".{LAYER_PARTS[0]}"))
    names = [f"layers.{i}.{part}" for i in range(count) for part in LAYER_PARTS] + ["lm_head"]
    tensors = read_into_block(source, [f"{name}.{field}" for name in names
                                       for field in ("quants", "scales")])

    def linear(name: str) -> PackedLinear:
        kind, out_features, in_features = shapes[name]
        return PackedLinear(tensors[f"{name}.quants"], tensors[f"{name}.scales"], kind,
                            out_features, in_features)

    layers = [tuple(linear(f"layers.{i}.{part}") for part in LAYER_PARTS) for i in range(count)]
    return PackedLlama(layers, linear("lm_head"))  # type: ignore[arg-type]


def gguf_source(name: str) -> Path | None:
    """The GGUF file a model of this registry name was loaded from, if it was one."""
    from sampler_core.engine.models import DEFAULT_MODEL_NAME, bundled_gguf_path

    if name == DEFAULT_MODEL_NAME:
        return bundled_gguf_path()
    path = Path(name)
    return path if path.suffix == ".gguf" and path.is_file() else None


def weights_mode() -> str:
    """``$PROMPT_IDE_WEIGHTS``: ``packed`` (default, same answers as float32) or ``float32``."""
    mode = os.environ.get("PROMPT_IDE_WEIGHTS", "packed").strip().lower() or "packed"
    if mode not in WEIGHT_MODES:
        raise ValueError(f"PROMPT_IDE_WEIGHTS must be one of {', '.join(WEIGHT_MODES)}, "
                         f"got {mode!r}")
    return mode


def prefill_mode() -> str:
    """``$PROMPT_IDE_PREFILL``: ``float32`` (default: exact arithmetic), ``fixed16`` or
    ``fast``.

    They differ in how prompts over ``PACKED_MAX_STEPS`` positions are computed, and so in the
    answers; ``bench/decode.py`` prints how much. ``fixed16`` rounds activations to 16-bit
    fixed point per block of 32 (linears ~1.4x faster than float32's; on 47 400-token prompts
    over 128 greedy tokens, probabilities within 1.4e-3 of float32's, past 1e-3 on two, and
    one greedy run parted from float32's where its top two tokens were 6e-6 apart). ``fast``
    rounds them to 8 bits and runs attention's products in bfloat16, like llama.cpp's Q8
    activations (time to first token under half of float32's; greedy runs part from
    float32's).
    """
    mode = (os.environ.get("PROMPT_IDE_PREFILL", DEFAULT_PREFILL).strip().lower()
            or DEFAULT_PREFILL)
    if mode not in PREFILL_MODES:
        raise ValueError(f"PROMPT_IDE_PREFILL must be one of {', '.join(PREFILL_MODES)}, "
                         f"got {mode!r}")
    return mode


def packed_for(name: str, model: Any) -> PackedLlama | None:
    """Packed weights for a loaded model when its GGUF file has them and the kernel builds.

    The first time, the blocks are read from the GGUF file and checked against the loaded
    float32 weights bit for bit, then cached (about 97 MB for the default model) so later
    loads take well under a second.
    """
    source = gguf_source(name)
    on_cpu = next(model.parameters()).device.type == "cpu"  # the kernel is a CPU kernel
    if source is None or not on_cpu or weights_mode() != "packed" or kernel() is None:
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > MAX_HEAD_DIM:
        return None
    cached = _cache_file(source)
    if cached.is_file():
        try:
            packed = _load(cached)
            if len(packed.layers) == len(model.model.layers):
                return packed
        except (OSError, KeyError, ValueError):
            pass  # rebuilt below
    packed = load_packed(source, model)
    if packed is not None:
        try:
            _save(packed, cached)
            packed = _load(cached)  # the same blocks, laid out as every later load has them
        except (OSError, KeyError, ValueError):
            pass  # no cache: the next load checks again
    return packed
