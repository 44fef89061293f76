"""The sampling engine on the real default model: every setting's effect, probabilities,
top-k, attention, prompt scoring, determinism and validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest
import torch

from sampler_core.errors import ContextOverflow, InvalidInput, InvalidSettings
from sampler_core.inputs import ImagePart, TokenIdsPart, to_parts
from sampler_core.settings import SampleSettings
from sampler_core.tokens import FinishReason, RunSummary, Token, TokenType

PROMPT = "The three primary colours are"


def run(engine, prompt=PROMPT, **settings):
    """Run to the end; return (tokens, summary)."""
    events = list(engine.start(to_parts(prompt), SampleSettings(**settings)))
    summary = events[-1]
    assert isinstance(summary, RunSummary)
    return [e for e in events[:-1]], summary


def ids(tokens):
    return [t.token_id for t in tokens if t.token_type == TokenType.MODEL]


def test_greedy_equals_argmax_of_a_full_forward(engine) -> None:
    tokens, summary = run(engine, max_len=12, temperature=0.0, stop_at_eos=False)
    prompt = engine.encode(PROMPT)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt + ids(tokens)], device=engine.device)).logits[0]
    expected = logits[len(prompt) - 1: -1].argmax(-1).tolist()
    assert ids(tokens) == expected
    assert all(t.prob == 1.0 and t.rank == 1 for t in tokens)
    assert summary.finish_reason == FinishReason.MAX_LEN and summary.num_generated_tokens == 12


def test_max_len_is_respected(engine) -> None:
    for n in (1, 7):
        tokens, summary = run(engine, max_len=n, temperature=1.0, rng_seed=5, stop_at_eos=False)
        assert len(tokens) == n and summary.num_generated_tokens == n


def test_a_disallowed_token_never_appears(engine) -> None:
    free, _ = run(engine, max_len=8, temperature=0.0, stop_at_eos=False)
    banned = sorted(set(ids(free)))[:3]
    tokens, _ = run(engine, max_len=8, temperature=0.0, stop_at_eos=False,
                    disallowed_tokens=banned)
    assert not set(ids(tokens)) & set(banned)
    assert ids(tokens) != ids(free)


def test_only_allowed_tokens_appear(engine) -> None:
    allowed = [" red", " green", " blue", ","]
    allowed_ids = {engine.resolve_token(a) for a in allowed}
    tokens, _ = run(engine, max_len=10, temperature=1.5, rng_seed=3, allowed_tokens=allowed,
                    stop_at_eos=False)
    assert len(tokens) == 10 and set(ids(tokens)) <= allowed_ids
    # The sampling probability renormalises over the allowed set, so it exceeds the raw one.
    assert all(t.prob >= t.raw_prob for t in tokens)


def test_stop_token_ends_the_run_and_is_excluded(engine) -> None:
    free, _ = run(engine, max_len=10, temperature=0.0, stop_at_eos=False)
    generated = ids(free)
    index = next(i for i in range(2, 10) if generated[i] not in generated[:i])
    stop = engine.piece(generated[index])
    tokens, summary = run(engine, max_len=10, temperature=0.0, stop_at_eos=False,
                          stop_tokens=[stop])
    assert ids(tokens) == generated[:index]
    assert summary.finish_reason == FinishReason.STOP_TOKEN and summary.stop_match == stop


def test_stop_string_is_included_and_may_run_past(engine) -> None:
    free, _ = run(engine, max_len=10, temperature=0.0, stop_at_eos=False)
    generated = ids(free)
    text_before = engine.detokenize(generated[:3])
    third = engine.piece(generated[3])
    stop = (text_before + third)[len(text_before) - 1: len(text_before) + 1]  # ends inside token 4
    assert stop not in text_before
    tokens, summary = run(engine, max_len=10, temperature=0.0, stop_at_eos=False,
                          stop_strings=[stop])
    assert ids(tokens) == generated[:4]
    assert summary.finish_reason == FinishReason.STOP_STRING and summary.stop_match == stop


def test_a_stop_token_that_is_not_one_token_is_reported(engine) -> None:
    _, summary = run(engine, max_len=2, stop_tokens=["not one token"])
    assert any("'not one token' is not one token" in n for n in summary.notes)


def test_word_start_marker_maps_to_the_tokenizers_own(engine) -> None:
    assert engine.resolve_token("\u2581world") == engine.resolve_token(" world") \
        == engine.tokenizer.get_vocab()["\u0120world"]
    assert engine.resolve_token("world") == engine.tokenizer.get_vocab()["world"]


def test_tiny_nucleus_gives_the_argmax(engine) -> None:
    greedy, _ = run(engine, max_len=8, temperature=0.0, stop_at_eos=False)
    nucleus, _ = run(engine, max_len=8, temperature=1.0, nucleus_p=1e-6, rng_seed=9,
                     stop_at_eos=False)
    assert ids(nucleus) == ids(greedy)


def test_probabilities_and_top_k(engine) -> None:
    tokens, _ = run(engine, max_len=6, temperature=1.0, nucleus_p=0.5, top_k=100, rng_seed=1,
                    stop_at_eos=False)
    for token in tokens:
        raw = [t.raw_prob for t in token.top_k]
        assert raw == sorted(raw, reverse=True) and len(raw) == 100
        assert sum(raw) <= 1.0 + 1e-5
        # The nucleus keeps a prefix of the raw ordering, so the top 100 hold all its mass.
        assert math.isclose(sum(t.prob for t in token.top_k), 1.0, abs_tol=1e-4)
        assert token.rank <= 100 and token.top_k[token.rank - 1].token_id == token.token_id
        assert math.isclose(token.logprob, math.log(token.raw_prob), rel_tol=1e-6)
        assert 0 <= token.entropy <= math.log(engine.vocab_size)


def test_token_figures_match_torch_distributions_on_the_models_logits(engine) -> None:
    """A scored prompt's log-probabilities, probabilities, ranks and entropies against
    ``Categorical`` over transformers' own logits for the same prompt (the engine's path
    differs from it by float32 summation order only)."""
    text = "The history of the printing press begins in the fifteenth century, when"
    tokens, _ = run(engine, prompt=text, max_len=0, score_prompt=True)
    prompt = engine.encode(text)
    assert [t.token_id for t in tokens] == prompt
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt], device=engine.device)).logits[0].float().cpu()
    for position in range(1, len(prompt)):
        token, row = tokens[position], logits[position - 1]
        reference = torch.distributions.Categorical(logits=row)
        chosen = row[prompt[position]]
        assert math.isclose(token.logprob, float(reference.logits[prompt[position]]), abs_tol=1e-4)
        assert math.isclose(token.raw_prob, math.exp(token.logprob), rel_tol=1e-6)
        assert math.isclose(token.entropy, float(reference.entropy()), abs_tol=1e-4)
        # Logits within float noise of the chosen one may rank either side of it.
        assert (int((row > chosen + 1e-4).sum()) + 1 <= token.rank
                <= int((row > chosen - 1e-4).sum()) + 1)


def test_top_k_count_is_configurable(engine) -> None:
    for k in (0, 5, 50):
        tokens, _ = run(engine, max_len=2, top_k=k)
        assert all(len(t.top_k) == k for t in tokens)


def test_attention_rows_cover_the_context_and_sum_to_one(engine) -> None:
    n_prompt = len(engine.encode(PROMPT))
    tokens, _ = run(engine, max_len=5, temperature=0.0, return_attention=True,
                    full_attention=True, stop_at_eos=False)
    for index, token in enumerate(tokens):
        assert len(token.attn_weights) == n_prompt + index
        assert math.isclose(sum(token.attn_weights), 1.0, abs_tol=1e-4)
        full = token.attention.weights
        assert full.shape == (engine.num_layers, engine.num_heads, n_prompt + index)
        assert abs(full.sum(-1) - 1).max() < 1e-4
        assert abs(full.mean(axis=(0, 1)) - token.attn_weights).max() < 1e-6
    without, _ = run(engine, max_len=5, temperature=0.0, stop_at_eos=False)
    assert ids(without) == ids(tokens) and without[0].attn_weights == ()


def test_attention_rows_match_eager_attention(engine) -> None:
    """Our row-only attention equals transformers' eager attention maps, last row."""
    from transformers import AutoModelForCausalLM

    tokens, _ = run(engine, max_len=3, temperature=0.0, full_attention=True, stop_at_eos=False)
    context = engine.encode(PROMPT) + ids(tokens)[:2]
    folder = engine.model.name_or_path
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.inference_mode():
        maps = eager(torch.tensor([context]), output_attentions=True).attentions
    last_rows = torch.stack([m[0, :, -1, :] for m in maps]).numpy()
    assert abs(last_rows - tokens[2].attention.weights).max() < 1e-4


def test_prompt_scoring_returns_teacher_forced_probabilities(engine) -> None:
    prompt = engine.encode(PROMPT)
    tokens, summary = run(engine, max_len=2, score_prompt=True, temperature=0.0)
    user = [t for t in tokens if t.token_type == TokenType.USER]
    assert [t.token_id for t in user] == prompt and summary.num_prompt_tokens == len(prompt)
    assert user[0].prob == 0.0 and user[0].raw_prob is None
    with torch.inference_mode():
        probs = torch.softmax(engine.model(torch.tensor([prompt], device=engine.device)).logits[0],
                              -1).cpu()
    for position in range(1, len(prompt)):
        expected = float(probs[position - 1, prompt[position]])
        assert math.isclose(user[position].raw_prob, expected, rel_tol=1e-4)
        assert user[position].position == position
    assert tokens[len(prompt)].token_type == TokenType.MODEL
    only_scores, _ = run(engine, max_len=0, score_prompt=True)
    assert len(only_scores) == len(prompt)


def test_same_seed_same_tokens_and_probabilities(engine) -> None:
    a, _ = run(engine, max_len=10, temperature=1.0, rng_seed=42, stop_at_eos=False)
    b, _ = run(engine, max_len=10, temperature=1.0, rng_seed=42, stop_at_eos=False)
    c, _ = run(engine, max_len=10, temperature=1.0, rng_seed=43, stop_at_eos=False)
    assert [(t.token_id, t.prob, t.raw_prob) for t in a] == [(t.token_id, t.prob, t.raw_prob)
                                                             for t in b]
    assert ids(a) != ids(c)


def test_determinism_across_processes(engine) -> None:
    code = (
        "import json;from sampler_core.engine import get_engine;"
        "from sampler_core.inputs import to_parts;from sampler_core.settings import SampleSettings;"
        "e=get_engine('');"
        f"ev=list(e.start(to_parts({PROMPT!r}),SampleSettings(max_len=8,temperature=1.0,"
        "rng_seed=42,stop_at_eos=False)));"
        "print(json.dumps([[t.token_id,t.prob,t.raw_prob] for t in ev[:-1]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    here, _ = run(engine, max_len=8, temperature=1.0, rng_seed=42, stop_at_eos=False)
    assert json.loads(out) == [[t.token_id, t.prob, t.raw_prob] for t in here]


def test_concurrent_runs_match_runs_alone(engine) -> None:
    prompts = [("Once upon a time", 11), ("def fibonacci(n):", 12), ("Paris is", 13)]
    alone = [ids(run(engine, p, max_len=10, temperature=1.0, rng_seed=s, stop_at_eos=False)[0])
             for p, s in prompts]
    together: list = [None] * len(prompts)

    def work(i: int) -> None:
        p, s = prompts[i]
        together[i] = ids(run(engine, p, max_len=10, temperature=1.0, rng_seed=s,
                              stop_at_eos=False)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_cancellation_stops_before_the_next_step(engine) -> None:
    seen: list[Token] = []
    generation = engine.start(to_parts(PROMPT), SampleSettings(max_len=50, stop_at_eos=False),
                              cancelled=lambda: len(seen) >= 3)
    for event in generation:
        if isinstance(event, Token):
            seen.append(event)
        else:
            summary = event
    assert len(seen) == 3 and summary.finish_reason == FinishReason.CANCELLED


def test_context_overflow_names_both_numbers(engine) -> None:
    n = len(engine.encode(PROMPT))
    with pytest.raises(ContextOverflow, match=rf"prompt of {n} tokens plus max_len 8190 is "
                                              rf"{n + 8190} tokens, beyond the context window of "
                                              r"8192 tokens"):
        engine.start(to_parts(PROMPT), SampleSettings(max_len=8190))


def test_bad_inputs_get_clear_errors(engine) -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: token id 49152 is outside the "
                                           r"vocabulary of .* \(ids 0..49151\)"):
        engine.start([TokenIdsPart((1, 49152))], SampleSettings())
    with pytest.raises(InvalidInput, match=r"inputs\[1\]: model .* takes text only; send images"):
        engine.start([TokenIdsPart((1,)), ImagePart(b"\x89PNG")], SampleSettings())
    with pytest.raises(InvalidInput, match=r"inputs must hold at least one non-empty part"):
        to_parts("")
    with pytest.raises(InvalidSettings, match=r"allowed_tokens .* name no vocabulary token"):
        engine.start(to_parts(PROMPT), SampleSettings(allowed_tokens=["no such token at all"]))


def test_token_id_inputs_and_text_give_the_same_run(engine) -> None:
    settings = SampleSettings(max_len=5, temperature=0.0)
    by_text = list(engine.start(to_parts(PROMPT), settings))[:-1]
    by_ids = list(engine.start(to_parts(engine.encode(PROMPT)), settings))[:-1]
    assert ids(by_text) == ids(by_ids)


def test_tokenize_round_trips(engine) -> None:
    text = "Hello world,\tcafé 🙂 東京  two  spaces\n"
    tokens = engine.tokenize(text)
    assert engine.detokenize([t.token_id for t in tokens]) == text
    assert all(t.prob == 0.0 and t.token_type == TokenType.USER for t in tokens)
    assert [t.position for t in tokens] == list(range(len(tokens)))


def test_chat_prompt_uses_the_template(engine) -> None:
    prompt = engine.chat_prompt("What is 2+2?")
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "What is 2+2?" in prompt
