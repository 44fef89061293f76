"""The fast decode path (packed GGUF weights, C decode step) gives the float32 model's answers.

The reference is transformers' own float32 forward over the dequantised weights (the model as
loaded, untouched by the fast path). Same greedy tokens, probabilities within 1e-3, attention
rows equal to eager attention, results independent of the thread count, seeds reproducible.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import need
from pages import PAGEMAP, resident_bytes
from sampler_core.inputs import TokenIdsPart
from sampler_core.settings import SampleSettings
from sampler_core.tokens import Token

PROMPTS = (
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time in a small village,",
    "Water boils at",
    # Longer than PACKED_MAX_STEPS: its prefill runs on weights rebuilt from the blocks.
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe. Printers in Venice, Paris and "
    "London soon competed for the best type, paper and ink, and",
)


@pytest.fixture(scope="module")
def fast(cpu_engine):
    """The CPU engine, which must be running its packed decode path."""
    from sampler_core.engine import packed

    need(packed.kernel() is not None, f"packed-weight kernel unavailable: {packed.kernel_error()}")
    cpu = cpu_engine
    assert cpu._fast is not None and cpu._fast.weights == "packed"
    # Every run here computes its prompt: a run that reused an earlier run's prefill would
    # equal it whatever the path under test did (reuse has its own tests).
    budget = cpu.prompt_cache.max_bytes
    cpu.prompt_cache.resize(0)
    try:
        yield cpu
    finally:
        cpu.prompt_cache.resize(budget)


@contextmanager
def prefill_as(runner, mode: str, kernel_attention: bool = True) -> Iterator[None]:
    """The runner's long prefills in ``mode`` for the body; then as they were."""
    before = (runner.prefill_attention_kernel, runner.prefill_mode)
    runner.set_prefill(kernel_attention=kernel_attention, mode=mode)
    try:
        yield
    finally:
        runner.set_prefill(kernel_attention=before[0], mode=before[1])


def tokens_of(engine, ids, **settings) -> list[Token]:
    run = engine.start([TokenIdsPart(tuple(ids))], SampleSettings(stop_at_eos=False, **settings))
    return [e for e in run if isinstance(e, Token)]


def test_packed_blocks_are_the_float32_weights_bit_for_bit(fast) -> None:
    packed = fast._fast.packed
    layer = fast.model.model.layers[7]
    qkv = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                     layer.self_attn.v_proj.weight])
    assert packed.layers[7][0].equals(qkv)
    assert torch.equal(packed.layers[7][3].unpack(), layer.mlp.down_proj.weight)
    assert packed.lm_head.equals(fast.model.lm_head.weight)


def test_token_rows_come_from_the_tied_embeddings_blocks_bit_for_bit(fast) -> None:
    head = fast._fast._packed_embed
    assert head is fast._fast.packed.lm_head  # SmolLM2 ties its embedding and output head
    assert torch.equal(head.rows(torch.arange(head.out_features)), fast.model.lm_head.weight)
    ids = torch.tensor([5, 0, 49151, 5])
    out = torch.full((4, head.in_features), float("nan"))
    assert head.rows(ids, out) is out and torch.equal(out, fast._fast.embed[ids])
    with pytest.raises(ValueError, match=r"row ids must be in 0\.\.49151, got -1\.\.5"):
        head.rows(torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(4, 576\), got \(4, 575\)"):
        head.rows(ids, torch.empty(4, 575))


@pytest.mark.skipif(not PAGEMAP.exists(), reason="Linux only (reads /proc/self/pagemap)")
def test_runs_on_the_packed_path_leave_the_float32_weights_unread(fast) -> None:
    """Mapped from their file, every page of them read would count in the process's memory
    (a whole page-cache folio each, up to 2 MB): prompts, decode steps and a batched step
    take token rows from the packed blocks and never touch the float32 tables."""
    from sampler_core.engine.weight_block import release_pages

    unread = fast._fast._unread_weights()
    assert any(w is fast._fast.embed for w in unread) and len(unread) == 7 * fast.num_layers + 1
    release_pages(unread)  # other tests read them, for their references
    before = sum(resident_bytes(w) for w in unread)
    tokens_of(fast, fast.encode(PROMPTS[4]), max_len=4, temperature=0.0)  # a long prefill
    tokens_of(fast, fast.encode(PROMPTS[0]), max_len=4, temperature=0.0)  # a short one
    caches = [fast._fast.new_cache(8) for _ in range(2)]
    fast._fast.decode_many([(1000, caches[0], False), (2000, caches[1], True)])
    assert sum(resident_bytes(w) for w in unread) - before <= 64 * 1024


def test_packed_blocks_lie_in_one_block_in_the_order_a_decode_step_reads_them(fast) -> None:
    packed = fast._fast.packed
    tensors = [t for layer in packed.layers for w in layer for t in (w.quants, w.scales)]
    starts = [t.data_ptr() for t in [*tensors, packed.lm_head.quants, packed.lm_head.scales]]
    assert starts[0] % (2 << 20) == 0 and starts == sorted(starts)
    ends = [t.data_ptr() + t.numel() * t.element_size() for t in tensors]
    assert all(0 <= start - end < 64 for end, start in zip(ends, starts[1:]))  # no gaps


def test_greedy_128_tokens_match_the_float32_reference(fast) -> None:
    assert len(PROMPTS) >= 5
    for text in PROMPTS:
        ids = fast.encode(text)
        tokens = tokens_of(fast, ids, max_len=128, temperature=0.0)
        got = [t.token_id for t in tokens]
        with torch.inference_mode():
            logits = fast.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        assert got == logits.argmax(-1).tolist(), text
        probs = torch.softmax(logits, dim=-1)
        expected = probs[torch.arange(len(got)), torch.tensor(got)]
        assert max(abs(t.raw_prob - float(e)) for t, e in zip(tokens, expected)) < 1e-3


def test_sampling_is_deterministic_per_seed(fast) -> None:
    ids = fast.encode(PROMPTS[2])
    settings = dict(max_len=24, temperature=1.0, nucleus_p=0.95, top_k=5, return_attention=True)
    first = tokens_of(fast, ids, rng_seed=11, **settings)
    again = tokens_of(fast, ids, rng_seed=11, **settings)
    assert first == again
    other = tokens_of(fast, ids, rng_seed=12, **settings)
    assert [t.token_id for t in other] != [t.token_id for t in first]


def test_results_do_not_depend_on_the_thread_count(fast) -> None:
    from sampler_core.engine import packed

    x = torch.randn(3, fast._fast.hidden, generator=torch.Generator().manual_seed(0))
    head = fast._fast.packed.lm_head
    packed.use_threads(1)
    try:
        one = head(x)
    finally:
        packed.use_threads(torch.get_num_threads())
    assert torch.equal(one, head(x))


def test_float32_prefills_run_the_kernels_jobs_on_torchs_threads_with_the_same_results(
        fast, monkeypatch) -> None:
    """Between oneDNN's products a float32 prefill's kernel jobs (attention, rotary, SiLU) run
    on torch's OpenMP threads, which the kernel built with OpenMP shares (one runtime in the
    process): every figure as on the kernel's own pool."""
    from contextlib import nullcontext

    from sampler_core.engine import fast_llama, threads

    runner = fast._fast
    assert threads._one_openmp_runtime()  # torch's libgomp, and the kernel's is the same
    assert runner._kernel.pool_use_openmp(1) == 1 and runner._kernel.pool_use_openmp(0) == 0
    ids = torch.tensor(fast.encode(PROMPTS[4]) * 4)

    def prefill() -> tuple[torch.Tensor, torch.Tensor]:
        cache = runner.new_cache(len(ids))
        logits, rows = runner.forward(ids, cache, attention=True, prefill="float32")
        return logits, rows

    on_torch_threads = prefill()
    monkeypatch.setattr(fast_llama, "kernel_on_torch_threads", lambda kernel: nullcontext())
    on_the_pool = prefill()
    assert all(torch.equal(a, b) for a, b in zip(on_torch_threads, on_the_pool))


def test_the_long_prefill_product_is_float32_and_the_same_per_row_where_probed(fast) -> None:
    """oneDNN's product, which long prefills multiply float32 weights by: within float32
    rounding of a float64 product, and each row the same whatever the thread count (so seeded
    runs stay bit for bit repeatable). Where the probe ``rows_agree`` passes, each row is also
    the same whatever the row count past one, at counts the probe does not try, and float32
    prompts may run a tail after a kept head; where it fails (an Intel Xeon with torch 2.11's
    oneDNN: another kernel up to 65 rows), they never do. A single row takes another kernel:
    within rounding, not equal."""
    from sampler_core.engine.fast_llama import ROW_PROBE, onednn_linear

    product = onednn_linear()
    need(product is not None, "this torch build lacks oneDNN's linear")
    assert fast._fast.onednn_linears and fast._fast.dense_product is product
    weight = fast._fast.packed.layers[3][2].unpack()  # gate/up: [3072, 576]
    x = torch.randn(700, weight.shape[1], generator=torch.Generator().manual_seed(0))
    full = product(x, weight)
    exact = x.double() @ weight.double().T
    assert float((full.double() - exact).abs().max() / exact.abs().max()) < 1e-5
    counts = (4, 5, 7, 31, 32, 64, 66, 97, 128, 299, 513)
    assert not set(counts) & set(ROW_PROBE)
    if fast._fast._onednn_rows_agree:
        for rows in counts:
            assert torch.equal(product(x[-rows:].contiguous(), weight), full[-rows:]), rows
        assert fast._fast.tails_match_whole_prefills("float32")
    else:
        assert not fast._fast.tails_match_whole_prefills("float32")
    assert fast._fast.tails_match_whole_prefills("fixed16")  # each row rounded on its own
    assert torch.allclose(product(x[-1:].contiguous(), weight), full[-1:], rtol=0, atol=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = product(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


def test_decode_attention_rows_equal_eager_attention_after_a_long_prefill(fast) -> None:
    from transformers import AutoModelForCausalLM

    ids = fast.encode(PROMPTS[-1])
    tokens = tokens_of(fast, ids, max_len=3, temperature=0.0, return_attention=True,
                       full_attention=True, prefill="float32")  # held to float32's rounding
    context = ids + [t.token_id for t in tokens][:2]
    eager = AutoModelForCausalLM.from_pretrained(fast.model.name_or_path,
                                                 attn_implementation="eager")
    with torch.inference_mode():
        maps = eager(torch.tensor([context]), output_attentions=True).attentions
    last_rows = torch.stack([m[0, :, -1, :] for m in maps]).numpy()
    assert last_rows.shape == tokens[2].attention.weights.shape
    assert abs(last_rows - tokens[2].attention.weights).max() < 1e-4


def test_decode_over_several_attention_pieces_matches_eager_and_any_thread_count(fast) -> None:
    """A context of ~300 positions spans three of the kernel's 128-position attention pieces
    (a split softmax): rows and probabilities still match eager attention and a float32
    forward, and one thread gives bit for bit what two give."""
    from transformers import AutoModelForCausalLM

    from sampler_core.engine import packed

    ids = (fast.encode(PROMPTS[-1] + " ") * 8)[:300]
    # The prompt in float32: this test holds the decode step to float32's rounding.
    settings = dict(max_len=4, temperature=0.0, return_attention=True, full_attention=True,
                    prefill="float32")
    tokens = tokens_of(fast, ids, **settings)
    context = ids + [t.token_id for t in tokens][:3]
    eager = AutoModelForCausalLM.from_pretrained(fast.model.name_or_path,
                                                 attn_implementation="eager")
    with torch.inference_mode():
        out = eager(torch.tensor([context]), output_attentions=True)
    last_rows = torch.stack([m[0, :, -1, :] for m in out.attentions]).numpy()
    assert last_rows.shape == tokens[3].attention.weights.shape == (30, 9, 303)
    assert abs(last_rows - tokens[3].attention.weights).max() < 1e-4
    probs = torch.softmax(out.logits[0, len(ids) - 1:], dim=-1)
    for n, token in enumerate(tokens):
        assert token.token_id == int(probs[n].argmax())
        assert abs(token.raw_prob - float(probs[n, token.token_id])) < 1e-4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    packed.use_threads(1)
    try:
        alone = tokens_of(fast, ids, **settings)
    finally:
        torch.set_num_threads(threads)
        packed.use_threads(threads)
    assert [(t.token_id, t.raw_prob) for t in alone] == [(t.token_id, t.raw_prob) for t in tokens]
    assert all((a.attention.weights == b.attention.weights).all()
               for a, b in zip(alone, tokens))


def test_contexts_beyond_the_kernels_limit_decode_through_the_loop(fast, monkeypatch) -> None:
    """Past the C decode step's context limit, steps go through the per-layer loop (packed
    matmuls, torch attention): the same tokens, probabilities within 1e-5."""
    settings = dict(max_len=12, temperature=0.0, return_attention=True)
    ids = fast.encode(PROMPTS[0])
    in_c = tokens_of(fast, ids, **settings)
    monkeypatch.setattr(fast._fast, "_decode_max_context", 0)
    in_loop = tokens_of(fast, ids, **settings)
    assert [t.token_id for t in in_loop] == [t.token_id for t in in_c]
    assert max(abs(a.raw_prob - b.raw_prob) for a, b in zip(in_loop, in_c)) < 1e-5
    assert max(abs(x - y) for a, b in zip(in_loop, in_c)
               for x, y in zip(a.attn_weights, b.attn_weights)) < 1e-5


def test_decode_of_a_token_equals_forward_on_it(fast) -> None:
    """``decode`` (the step loop's lean call: the embedding row copied into a per-run buffer)
    gives what ``forward`` on the same id gives, bit for bit: logits, attention, cache."""
    runner = fast._fast
    ids = fast.encode(PROMPTS[4])
    caches = [runner.new_cache(len(ids) + 8) for _ in range(2)]
    for cache in caches:
        runner.forward(torch.tensor(ids), cache)
    for token in (ids[-1], 0, fast.vocab_size - 1, 42):
        lean, lean_rows = runner.decode(token, caches[0], attention=True)
        full, full_rows = runner.forward(torch.tensor([token]), caches[1], attention=True)
        assert torch.equal(lean, full) and torch.equal(lean_rows, full_rows)
    assert caches[0].length == caches[1].length == len(ids) + 4
    assert torch.equal(caches[0].keys[:, :, :len(ids) + 4], caches[1].keys[:, :, :len(ids) + 4])
    assert torch.equal(caches[0].values[:, :, :len(ids) + 4],
                       caches[1].values[:, :, :len(ids) + 4])
    with pytest.raises(ValueError, match=f"token id {fast.vocab_size} is outside the vocabulary"):
        runner.decode(fast.vocab_size, caches[0])



@pytest.mark.parametrize("length", [5, 40, 300])
@pytest.mark.parametrize("kernel_attention", [True, False])
def test_a_prompts_last_layer_runs_on_its_last_row_alone(fast, monkeypatch, length,
                                                        kernel_attention) -> None:
    """Past the last layer's keys and values only the last position matters (unless every
    position's logits are asked for): that layer's attention and MLP then run on one row,
    with the same cache, attention row and, to float32 summation order, the same logits."""
    runner = fast._fast
    ids = torch.tensor((fast.encode(PROMPTS[4]) * 8)[:length])
    mlp_rows: list[int] = []
    silu_times = runner._silu_times
    monkeypatch.setattr(runner, "_silu_times",
                        lambda gate_up: mlp_rows.append(gate_up.shape[0]) or silu_times(gate_up))
    with prefill_as(runner, "float32", kernel_attention):
        caches = [runner.new_cache(length) for _ in range(2)]
        every, every_rows = runner.forward(ids, caches[0], all_logits=True, attention=True)
        assert mlp_rows[-1] == length
        last, last_rows = runner.forward(ids, caches[1], attention=True)
        assert mlp_rows[-2:] == [length, 1]  # the next-to-last layer whole, the last one row
    assert last.shape == (1, fast.vocab_size)
    assert (every[-1] - last[0]).abs().max() < 1e-4
    assert torch.allclose(every_rows, last_rows, atol=1e-6)
    assert torch.equal(caches[0].keys, caches[1].keys)
    assert torch.equal(caches[0].values, caches[1].values)

def test_weights_mode_is_validated(monkeypatch) -> None:
    from sampler_core.engine.packed import weights_mode

    monkeypatch.setenv("PROMPT_IDE_WEIGHTS", "float32")
    assert weights_mode() == "float32"
    monkeypatch.setenv("PROMPT_IDE_WEIGHTS", "int3")
    with pytest.raises(ValueError, match="PROMPT_IDE_WEIGHTS must be one of packed, float32"):
        weights_mode()


def test_prefill_mode_is_validated(monkeypatch) -> None:
    from sampler_core.engine.packed import prefill_mode

    monkeypatch.delenv("PROMPT_IDE_PREFILL", raising=False)
    assert prefill_mode() == "float32"  # exact: fixed16 goes past 1e-3 on some prompts
    monkeypatch.setenv("PROMPT_IDE_PREFILL", "float32")
    assert prefill_mode() == "float32"
    monkeypatch.setenv("PROMPT_IDE_PREFILL", " Fast ")
    assert prefill_mode() == "fast"
    monkeypatch.setenv("PROMPT_IDE_PREFILL", "int4")
    with pytest.raises(ValueError, match="PROMPT_IDE_PREFILL must be one of float32, fixed16, "
                                         "fast, got 'int4'"):
        prefill_mode()


def _eager_attention(q, keys, values, start: int, group: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with a causal mask after ``start`` cached positions."""
    steps = q.shape[1]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = (q.double() @ k.double().transpose(1, 2)) * scale
    mask = torch.ones(steps, start + steps, dtype=torch.bool).tril(diagonal=start)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ v.double()).transpose(0, 1).reshape(steps, -1).float()


def _attention_kernel_run(runner, q, cache, start: int, steps: int, mode: str) -> torch.Tensor:
    return runner._attention_kernel(q, cache, 4, start, steps, bf16=mode == "fast")


@pytest.mark.parametrize("start, steps", [(0, 2), (0, 37), (0, 300), (5, 70), (129, 33)])
def test_prefill_attention_kernel_equals_eager_attention(fast, start, steps) -> None:
    """The C prefill attention (causal, grouped heads, one pass of 64-key steps) against a
    float64 eager softmax, over odd sizes, a cached prefix, and 1 or 2 threads alike; its
    bfloat16 variant (the ``fast`` prefill) within bfloat16's rounding, deterministically."""
    from sampler_core.engine import packed

    runner = fast._fast
    assert runner._prefill_attention
    gen = torch.Generator().manual_seed(steps)
    cache = runner.new_cache(start + steps + 7)
    cache.keys.normal_(generator=gen)
    cache.values.normal_(generator=gen)
    q = torch.randn(runner.num_heads, steps, runner.head_dim, generator=gen) * 3
    end = start + steps
    expected = _eager_attention(q, cache.keys[4, :, :end], cache.values[4, :, :end], start,
                                runner.group, runner.scale)
    got = runner._attention_kernel(q, cache, 4, start, steps, bf16=False)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 2e-5
    packed.use_threads(1)
    try:
        alone = runner._attention_kernel(q, cache, 4, start, steps, bf16=False)
    finally:
        packed.use_threads(torch.get_num_threads())
    assert torch.equal(alone, got)
    if not packed.kernel().prefill_attention_bf16_supported():
        return
    approx = _attention_kernel_run(runner, q, cache, start, steps, "fast")
    error = (approx - expected).abs().max()
    assert 1e-4 < error < 0.1  # rounded to bfloat16 (8 bits), and no worse than that
    assert torch.equal(_attention_kernel_run(runner, q, cache, start, steps, "fast"), approx)


def test_set_prefill_is_validated(fast, monkeypatch) -> None:
    runner = fast._fast
    before = runner.prefill_mode
    with pytest.raises(ValueError, match="mode must be one of float32, fixed16, fast, got 'x'"):
        runner.set_prefill(kernel_attention=True, mode="x")
    with pytest.raises(ValueError, match="mode 'fast' needs the attention kernel"):
        runner.set_prefill(kernel_attention=False, mode="fast")
    assert runner.prefill_mode == before and runner._prefill_attention  # left as it was
    # A GGUF file whose layers are not all Q4_1 (a Q8_0 one here) cannot run fixed point.
    need(runner._kernel.prefill_supported() == 1, "this CPU lacks AVX-512 VNNI")
    layers = list(runner.packed.layers)
    layers[3] = (replace(layers[3][0], kind=1), *layers[3][1:])
    monkeypatch.setattr(runner.packed, "layers", layers)
    with pytest.raises(ValueError, match="mode 'fixed16' needs Q4_1 layer weights"):
        runner.set_prefill(kernel_attention=True, mode="fixed16")


@pytest.mark.parametrize("part, rows, out_rows",
                         [(0, 70, None), (2, 33, None), (3, 41, 40), (1, 39, None)])
def test_fixed_point_prefill_matmul_is_within_its_rounding(fast, part, rows, out_rows) -> None:
    """x @ W^T with x in 16- or 8-bit fixed point per block of 32: within 2e-4 (16 bits) or
    5e-2 (8 bits) of the largest output of the float32 product, all outputs written (a partial
    last panel too; last groups of 1, 2 and 3 rows beside the kernel's 4), any thread count."""
    from sampler_core.engine import packed
    from sampler_core.engine.packed import PackedLinear

    need(packed.kernel().prefill_supported() == 1, "this CPU lacks AVX-512 VNNI")
    linear = fast._fast.packed.layers[11][part]
    if out_rows is not None:  # a weight whose rows do not fill the last panel of 16
        linear = PackedLinear(linear.quants[:out_rows].clone(), linear.scales[:out_rows].clone(),
                              linear.kind, out_rows, linear.in_features)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, linear.in_features, generator=gen) * torch.rand(
        rows, 1, generator=gen) * 4
    expected = x.double() @ linear.unpack().double().T
    for bits, bound in ((16, 2e-4), (8, 5e-2)):
        got = linear.prefill(x, bits)
        assert got.shape == expected.shape
        error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
        assert bound / 100 < error < bound  # rounded (not exact), as much as the bits allow
        packed.use_threads(1)
        try:
            assert torch.equal(linear.prefill(x, bits), got)
        finally:
            packed.use_threads(torch.get_num_threads())


@pytest.mark.parametrize("bits", [16, 8])
def test_fixed_point_prefill_takes_norm_silu_and_residual_into_its_passes(fast, bits) -> None:
    """With ``norm`` it equals the product of the torch-normalised rows to within a step of
    its rounding (the norm's sum runs in another order); ``gated`` (silu(gate) * up) and
    ``residual`` give bit for bit the separate SiLU pass and the sum after; each row the same
    whatever rows run with it. Shapes are checked by name."""
    from sampler_core.engine import packed

    need(packed.kernel().prefill_supported() == 1, "this CPU lacks AVX-512 VNNI")
    runner = fast._fast
    linear, weight = runner.packed.layers[9][2], runner.layers[9][3]  # gate/up, its norm
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(37, linear.in_features, generator=gen) * 3
    normed = linear.prefill(x, bits, norm=weight, eps=runner.eps)
    unfused = linear.prefill(runner._norm(x, weight), bits)
    error = float((normed - unfused).abs().max() / unfused.abs().max())
    assert error < 1e-5  # measured: 5.6e-6 (16 bits), 2.5e-7 (8)
    assert torch.equal(linear.prefill(x[30:], bits, norm=weight, eps=runner.eps), normed[30:])
    residual = torch.randn(37, linear.out_features, generator=gen)
    assert torch.equal(linear.prefill(x, bits, residual=residual),
                       residual + linear.prefill(x, bits))
    down = runner.packed.layers[9][3]
    gate_up = torch.randn(37, 2 * down.in_features, generator=gen) * 2
    down_residual = residual[:, :down.out_features]
    fused = down.prefill(gate_up, bits, gated=True, residual=down_residual)
    assert torch.equal(fused, down_residual + down.prefill(runner._silu_times(gate_up), bits))
    assert torch.equal(down_residual[30:] + down.prefill(gate_up[30:], bits, gated=True),
                       fused[30:])
    with pytest.raises(ValueError, match=r"x must have 3072 columns \(gate, then up\), got "
                                         r"shape \(37, 1536\)"):
        down.prefill(gate_up[:, :1536], bits, gated=True)
    with pytest.raises(ValueError, match=r"norm must have shape \(576,\), got \(3,\)"):
        linear.prefill(x, bits, norm=weight[:3])
    with pytest.raises(ValueError, match=r"residual must have shape \(37, 3072\), got \(37, 5\)"):
        linear.prefill(x, bits, residual=residual[:, :5])


def test_fixed16_prefill_stays_within_its_rounding_of_the_reference(fast) -> None:
    """The opt-in ``fixed16`` prefill on prompts of ~400 tokens: probabilities within 2e-3 of
    the float32 reference's (measured over 128 tokens of 47 prompts: 1.4e-3 at worst, past
    the same-answers rule's 1e-3 on two, which is why it is not the default), and greedy
    tokens the reference's except where its top two are that near a tie. Prompts: windows of
    this file's own text (varied, and stable unless the tests change)."""
    from sampler_core.engine import packed

    need(packed.kernel().prefill_supported() == 1, "this CPU lacks AVX-512 VNNI")
    with prefill_as(fast._fast, "fixed16"):
        for ids in _file_windows(fast):
            tokens = tokens_of(fast, ids, max_len=24, temperature=0.0)
            got = [t.token_id for t in tokens]
            with torch.inference_mode():
                logits = fast.model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
            probs = torch.softmax(logits, dim=-1)
            for n in (n for n, (a, b) in enumerate(zip(got, logits.argmax(-1))) if a != b):
                top = probs[n].topk(2).values
                assert float(top[0] - top[1]) < 2e-3, n  # a near tie, not a run gone astray
            expected = probs[torch.arange(len(got)), torch.tensor(got)]
            assert max(abs(t.raw_prob - float(e)) for t, e in zip(tokens, expected)) < 2e-3


def _file_windows(fast) -> list[list[int]]:
    """Five 400-token windows of this file's own text (varied, stable unless tests change)."""
    words = fast.encode(Path(__file__).read_text())
    return [words[offset:offset + 400] for offset in range(0, 5 * 500, 500)]


def test_fast_prefill_stays_near_the_reference_and_is_deterministic(fast) -> None:
    """The opt-in ``fast`` prefill (8-bit activations, bfloat16 attention products) is not
    exact (bench/decode.py prints how far off: greedy runs part within 32 tokens), but after a
    400-token prompt its next-token distribution stays within a total variation of 0.25 of
    the reference's (measured: up to 0.08; a broken kernel gives near 1) and mostly keeps its
    most likely token; and a seed gives the same run twice."""
    from sampler_core.engine import packed

    kernel = packed.kernel()
    need(kernel.prefill_supported() == 1 and kernel.prefill_attention_bf16_supported() == 1,
         "this CPU lacks AVX-512 VNNI or BF16")
    runner = fast._fast
    with prefill_as(runner, "fast"):
        same_top = 0
        for ids in _file_windows(fast):
            logits, _ = runner.forward(torch.tensor(ids), runner.new_cache(len(ids)))
            probs = torch.softmax(logits[-1], dim=-1)
            with torch.inference_mode():
                expected = torch.softmax(fast.model(torch.tensor([ids])).logits[0, -1], dim=-1)
            assert 0.5 * float((probs - expected).abs().sum()) < 0.25
            same_top += int(probs.argmax()) == int(expected.argmax())
        assert same_top >= 3
        settings = dict(max_len=8, temperature=1.0, rng_seed=5, return_attention=True)
        ids = _file_windows(fast)[1]
        assert tokens_of(fast, ids, **settings) == tokens_of(fast, ids, **settings)


def test_a_run_can_ask_for_its_prefill_by_name(fast) -> None:
    """``SampleSettings.prefill`` picks the mode for one run: what an engine whose default is
    that mode gives, bit for bit; the engine's default stays as it was; the run says what its
    prompt got (summary and note); a prompt short enough for the packed path is exact."""
    from sampler_core.engine import packed

    kernel = packed.kernel()
    need(kernel.prefill_supported() == 1 and kernel.prefill_attention_bf16_supported() == 1,
         "this CPU lacks AVX-512 VNNI or BF16")
    runner = fast._fast
    long_ids = _file_windows(fast)[2][:120]

    def run(ids, **extra):
        events = list(fast.start([TokenIdsPart(tuple(ids))], SampleSettings(
            max_len=6, temperature=1.0, rng_seed=2, top_k=3, stop_at_eos=False, **extra)))
        return [e for e in events if isinstance(e, Token)], events[-1]

    exact, exact_summary = run(long_ids)  # the default: float32, which needs no note
    assert runner.prefill_mode == "float32"
    assert exact_summary.prefill == "float32" and not exact_summary.notes
    fixed, fixed_summary = run(long_ids, prefill="fixed16")
    asked, summary = run(long_ids, prefill="fast")
    assert runner.prefill_mode == "float32"
    assert fixed_summary.prefill == "fixed16"
    assert any(n.startswith("prefill fixed16:") for n in fixed_summary.notes)
    assert summary.prefill == "fast" and any(n.startswith("prefill fast:") for n in summary.notes)
    assert [t.raw_prob for t in asked] != [t.raw_prob for t in exact]
    assert [t.raw_prob for t in fixed] != [t.raw_prob for t in exact]
    with prefill_as(runner, "fast"):
        by_default, default_summary = run(long_ids)
        exact_by_name, _ = run(long_ids, prefill="float32")
    with prefill_as(runner, "fixed16"):
        fixed_by_default, fixed_default_summary = run(long_ids)
    assert by_default == asked and default_summary == summary
    assert fixed_by_default == fixed and fixed_default_summary == fixed_summary
    assert exact_by_name == exact
    short, short_summary = run(long_ids[:20], prefill="fast")
    assert short_summary.prefill == "float32" and not short_summary.notes
    assert short == run(long_ids[:20])[0]


def test_a_prefill_the_engine_cannot_run_is_refused_by_name(fast, monkeypatch) -> None:
    from types import SimpleNamespace

    from sampler_core.errors import InvalidSettings
    from sampler_core.inputs import TextPart

    monkeypatch.setattr(fast._fast, "_kernel", SimpleNamespace(
        prefill_supported=lambda: 0, prefill_attention_bf16_supported=lambda: 0))
    with pytest.raises(InvalidSettings, match=r"prefill 'fixed16' needs packed weights on a CPU "
                                              r"with AVX-512 VNNI, which this engine does not "
                                              r"have here; use float32") as err:
        fast.start([TextPart("hi")], SampleSettings(prefill="fixed16"))
    assert err.value.field == "prefill" and err.value.value == "fixed16"


def test_every_kernel_source_ships_with_the_package() -> None:
    """The kernel builds from these files at run time, so an installed (not editable) package
    must carry each of them: pyproject's package-data has to match every one."""
    import fnmatch
    import tomllib

    from sampler_core.engine import packed

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["sampler_core"]
    for source in packed._SOURCES:
        relative = source.relative_to(root / "sampler_core").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative
