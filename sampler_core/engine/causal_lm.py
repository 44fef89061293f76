"""The sampling engine over a causal language model, with a KV cache.

One step loop (not ``generate()``): forward the pending tokens, run the processors, softmax,
pick, record. Attention rows come from the registered row-only attention function
(``attention.py``), so asking for them costs one row per head per layer, not a slow path.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from sampler_core.engine.attention import recorder_for
from sampler_core.engine.base import Event, FairLock
from sampler_core.engine.fast_llama import PACKED_MAX_STEPS, FastLlama, KVCache, supports
from sampler_core.engine.heap import keep_freed_memory
from sampler_core.engine.models import LoadedModel
from sampler_core.engine.packed import packed_for
from sampler_core.engine.processors import LogitsProcessor, argmax, build_chain, draw, top_ids
from sampler_core.engine.prompt_cache import (KeptPositions, KeptPrefill, PromptCache,
                                               budget_from_env)
from sampler_core.engine.step_batcher import Seat, StepBatcher
from sampler_core.engine.threads import one_thread
from sampler_core.errors import ContextOverflow, InvalidInput, InvalidSettings
from sampler_core.inputs import ImagePart, PromptPart, TextPart, TokenIdsPart
from sampler_core.settings import InputToken, SampleSettings
from sampler_core.tokens import AttentionDetail, FinishReason, RunSummary, Token, TokenType

#: The SentencePiece word-start marker the xAI SDK's ``augment_tokens`` prepends.
SENTENCEPIECE_MARKER = "\u2581"
#: While other runs decode, a long prompt prefills this many positions at a turn (~1 s here),
#: so their next tokens wait for a piece, not for the whole prompt. Each piece costs a pass
#: more over the layers' weights and earlier keys: a 2,000-token prefill took 17% longer in
#: pieces of 512, 39% in pieces of 256 (bench/stall.py gives the trade).
PREFILL_PIECE = 512


@dataclass(frozen=True)
class Plan:
    """A validated run: prompt ids, settings and what the settings resolved to."""

    prompt_ids: tuple[int, ...]
    settings: SampleSettings
    stop_ids: dict[int, str]
    chain: LogitsProcessor
    notes: tuple[str, ...]
    #: Engine-specific prompt data beyond the ids (a vision engine's prepared images).
    extra: Any = None
    #: How the prompt's forward computes (``settings.PREFILL_MODES``), resolved for this run:
    #: float32 for a prompt short enough for the packed (exact) path whatever was asked.
    prefill: str = "float32"


#: What a run's notes say when its prompt's forward may part from float32's answers (every
#: mode but float32, the default).
INEXACT_PREFILL_NOTES = {
    "fixed16": "prefill fixed16: the prompt's forward rounded activations to 16-bit fixed "
               "point (about 1.4x as fast, not exact: probabilities may differ from float32 "
               "by ~1e-3, and a greedy run may part from it where two tokens nearly tie)",
    "fast": "prefill fast: the prompt's forward rounded activations to 8 bits and ran "
            "attention in bfloat16 (about twice as fast, not exact: probabilities may differ "
            "from float32 by ~0.1, and greedy runs may part from it)",
}


class CausalLMGeneration:
    """A started run; iterate it for events (Tokens, then one RunSummary)."""

    def __init__(self, engine: "CausalLMEngine", plan: Plan,
                 cancelled: Callable[[], bool] | None) -> None:
        self.plan = plan
        self.prompt_ids = plan.prompt_ids
        self.notes = plan.notes
        self._events = engine._run(plan, cancelled or (lambda: False))

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def close(self) -> None:
        """Stop the run early; no further model work is done for it."""
        self._events.close()


class CausalLMEngine:
    """A loaded causal LM that tokenises and samples with full per-token instrumentation."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.name = loaded.name
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        config = self.model.config.get_text_config()  # a vision-language model's text half
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.context_window: int = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size: int = int(self.model.get_output_embeddings().weight.shape[0])
        #: Where the model runs (``devices.py``); the step loop's vocabulary math stays on the CPU.
        self.device: torch.device = next(self.model.parameters()).device
        self.eos_id: int | None = self.tokenizer.eos_token_id
        self._vocab: dict[str, int] = self.tokenizer.get_vocab()
        self._pieces: dict[int, str] = {}
        self._word_marker = self._detect_word_marker()
        self._steps = FairLock()
        self._recorder = recorder_for(config)
        # Llama-shaped models run through the lean runner; others through transformers. A model
        # from a GGUF file decodes from its packed blocks (same weights, a fifth of the bytes).
        self._fast = (FastLlama(self.model, packed_for(self.name, self.model))
                      if supports(self.model) else None)
        if self.device.type == "cpu":
            keep_freed_memory()  # a long prefill's layers reuse their temporaries (heap.py)
        #: Prefills kept for runs of the same prompt (the lean runner's caches only).
        self.prompt_cache = PromptCache(budget_from_env()) if self._fast is not None else None
        #: Decode steps of runs decoding at once, taken together on the packed CPU path.
        self._batcher = (StepBatcher(self._fast.decode_many, self._fast.max_batch, self._steps)
                         if self._fast is not None and self._fast.packed is not None else None)

    # ----- tokenizer -------------------------------------------------------------------------

    def _detect_word_marker(self) -> str:
        """How this tokenizer marks a word start: 'Ġ' (byte-level BPE), '▁' or ' '."""
        ids = self.tokenizer.encode(" hello", add_special_tokens=False)
        piece = self.tokenizer.convert_ids_to_tokens(ids[-1])
        return piece[: -len("hello")] if piece.endswith("hello") and piece != "hello" else " "

    def piece(self, token_id: int) -> str:
        """A token's text (decoded; a lone byte of a multi-byte character shows as U+FFFD)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._pieces[token_id] = text
        return text

    def encode(self, text: str) -> list[int]:
        """Text -> token ids, no special tokens added."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def tokenize(self, text: str) -> list[Token]:
        """Text -> USER tokens with probability 0, as the Tokenize RPC returns them."""
        return [Token(token_id=i, token_str=self.piece(i), prob=0.0, token_type=TokenType.USER,
                      position=n) for n, i in enumerate(self.encode(text))]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (exact round trip of what ``encode`` produced)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def chat_prompt(self, message: str, system: str | None = None) -> str:
        """Wrap one user message in the model's chat template, ready for the reply."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": message}]
        if not getattr(self.tokenizer, "chat_template", None):
            return message
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def resolve_token(self, token: InputToken) -> int | None:
        """A token given by id or text -> its id, or None when it is not one vocabulary token.

        A leading '▁' (the SDK's word-start variant) maps onto this tokenizer's own marker, so
        '▁world' means the token for ' world' here as it would for a SentencePiece model.
        """
        if isinstance(token, int):
            return token if 0 <= token < self.vocab_size else None
        candidates = [token]
        if token.startswith(SENTENCEPIECE_MARKER):
            candidates.append(self._word_marker + token[1:])
            candidates.append(" " + token[1:])
        for candidate in candidates:
            if candidate in self._vocab:
                return self._vocab[candidate]
        for candidate in candidates:
            ids = self.encode(candidate)
            if len(ids) == 1:
                return ids[0]
        return None

    # ----- planning: every check before any model work ----------------------------------------

    def check_token_ids(self, part: TokenIdsPart, position: int) -> tuple[int, ...]:
        """A token-ids part's ids, refused when one lies outside the vocabulary."""
        bad = [i for i in part.ids if i >= self.vocab_size]
        if bad:
            raise InvalidInput(
                f"inputs[{position}]: token id {bad[0]} is outside the vocabulary of "
                f"{self.name} (ids 0..{self.vocab_size - 1})",
                field=f"inputs[{position}]", value=bad[0])
        return part.ids

    def prompt_ids(self, parts: Sequence[PromptPart]) -> list[int]:
        """Prompt parts -> context token ids. Text-only engines refuse images."""
        ids: list[int] = []
        for position, part in enumerate(parts):
            if isinstance(part, TextPart):
                ids.extend(self.encode(part.text))
            elif isinstance(part, TokenIdsPart):
                ids.extend(self.check_token_ids(part, position))
            elif isinstance(part, ImagePart):
                raise InvalidInput(
                    f"inputs[{position}]: model {self.name!r} takes text only; send images "
                    "to a vision model such as 'vlm-1'", field="model_name", value=self.name)
        if not ids:
            raise InvalidInput("inputs: the prompt tokenised to no tokens", field="inputs",
                               value="")
        return ids

    def _resolve_list(self, field: str, entries: Sequence[InputToken],
                      notes: list[str]) -> dict[int, InputToken]:
        """Resolve a token list to ``{id: entry}``; entries that are not one token are noted.

        The SDK sends a '▁' variant next to every string; a pair counts as one entry, noted
        only when neither of the two names a token.
        """
        resolved: dict[int, InputToken] = {}
        failed: list[InputToken] = []
        for entry in entries:
            token_id = self.resolve_token(entry)
            if token_id is None:
                failed.append(entry)
            else:
                resolved.setdefault(token_id, entry)
        hits = set(resolved.values())
        for entry in failed:
            partner = (entry[1:] if entry.startswith(SENTENCEPIECE_MARKER)
                       else SENTENCEPIECE_MARKER + entry) if isinstance(entry, str) else None
            if partner in hits or (partner in failed and isinstance(entry, str)
                                   and entry.startswith(SENTENCEPIECE_MARKER)):
                continue
            what = (f"token id {entry} is outside the vocabulary (0..{self.vocab_size - 1})"
                    if isinstance(entry, int) else
                    f"{entry!r} is not one token (it tokenises to {len(self.encode(entry))})")
            notes.append(f"{field}: {what}; ignored")
        return resolved

    def context(self, parts: Sequence[PromptPart]) -> tuple[list[int], Any]:
        """Prompt parts -> (context ids, extra prompt data for the prefill); None extra here."""
        return self.prompt_ids(parts), None

    def plan(self, parts: Sequence[PromptPart], settings: SampleSettings) -> Plan:
        """Validate a request against this model and resolve its settings to token ids."""
        prompt, extra = self.context(parts)
        if len(prompt) + settings.max_len > self.context_window:
            raise ContextOverflow(
                f"prompt of {len(prompt)} tokens plus max_len {settings.max_len} is "
                f"{len(prompt) + settings.max_len} tokens, beyond the context window of "
                f"{self.context_window} tokens of {self.name}", field="max_len",
                value=settings.max_len)
        notes: list[str] = []
        stop_ids = {i: str(e) for i, e in
                    self._resolve_list("stop_tokens", settings.stop_tokens, notes).items()}
        allowed = sorted(self._resolve_list("allowed_tokens", settings.allowed_tokens, notes))
        banned = sorted(self._resolve_list("disallowed_tokens", settings.disallowed_tokens, notes))
        if settings.allowed_tokens and not allowed:
            raise InvalidSettings(
                f"allowed_tokens {list(settings.allowed_tokens)[:8]!r} name no vocabulary token "
                f"of {self.name}; nothing could be sampled", field="allowed_tokens",
                value=list(settings.allowed_tokens))
        if len(banned) >= self.vocab_size:
            raise InvalidSettings("disallowed_tokens bans the whole vocabulary",
                                  field="disallowed_tokens", value=len(banned))
        chain = build_chain(allowed=allowed, banned=banned, temperature=settings.temperature,
                            nucleus_p=settings.nucleus_p)
        prefill = self._prefill_mode(settings.prefill, len(prompt), notes)
        return Plan(tuple(prompt), settings, stop_ids, chain, tuple(notes), extra, prefill)

    def _prefill_mode(self, requested: str, prompt_length: int, notes: list[str]) -> str:
        """The run's prefill mode: the one asked for, else the engine's default. A mode this
        engine cannot run is refused; fixed16 and fast apply to prompts over
        ``PACKED_MAX_STEPS`` tokens only, and the run carries its mode into history and
        comparisons (``fast``, which may part from float32's answers, also in its notes)."""
        runner = self._fast
        mode = requested or (runner.prefill_mode if runner is not None else "float32")
        if mode == "float32":
            return mode
        try:
            if runner is None:
                raise ValueError(f"prefill {mode!r} needs the lean runner on packed weights, "
                                 f"and {self.name} runs through transformers; use float32")
            runner.check_prefill(mode)
        except ValueError as exc:
            raise InvalidSettings(str(exc), field="prefill", value=mode) from exc
        if prompt_length <= PACKED_MAX_STEPS:
            return "float32"
        if mode in INEXACT_PREFILL_NOTES:
            notes.append(INEXACT_PREFILL_NOTES[mode])
        return mode

    def start(self, parts: Sequence[PromptPart], settings: SampleSettings,
              cancelled: Callable[[], bool] | None = None) -> CausalLMGeneration:
        """Validate now; return a run whose iteration does the model work."""
        return CausalLMGeneration(self, self.plan(parts, settings), cancelled)

    # ----- the model ---------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], cache: DynamicCache | KVCache, *, all_logits: bool,
                 attention: bool, inputs: dict[str, torch.Tensor] | None = None,
                 prefill: str | None = None, seat: Seat | None = None,
                 as_long_prefill: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run pending tokens through the model; return logits (last or all) and attention rows.

        ``inputs`` replaces ``input_ids`` when given (a vision engine's ``inputs_embeds``, or
        ``input_ids`` with ``pixel_values``); ``prefill`` is the plan's mode for a prompt;
        ``seat`` is the run's at the step batcher, when it holds one; ``as_long_prefill`` (the
        lean runner's) runs a prompt's tail as a long prefill would.
        """
        if isinstance(cache, KVCache):
            embeds = inputs["inputs_embeds"][0] if inputs is not None else None
            if embeds is None and len(ids) == 1 and self._batched(cache):
                # A decode step, with whatever other runs' steps meet it (step_batcher.py).
                return self._batcher.step((ids[0], cache, attention), seat)
            with self._steps:  # one forward at a time, in arrival order: runs interleave fairly
                if embeds is None and len(ids) == 1:  # a decode step: the leanest call
                    logits, rows = self._fast.decode(ids[0], cache, attention=attention)
                else:
                    logits, rows = self._fast.forward(
                        torch.tensor(list(ids), device=self.device) if embeds is None else None,
                        cache, inputs_embeds=embeds, all_logits=all_logits, attention=attention,
                        prefill=prefill, as_long_prefill=as_long_prefill)
            # The vocabulary math and the seeded generator live on the CPU (a no-op there).
            return logits.cpu(), None if rows is None else rows.cpu()
        model_inputs = ({k: v.to(self.device) for k, v in inputs.items()} if inputs is not None
                        else {"input_ids": torch.tensor([list(ids)], device=self.device)})
        with self._steps:  # one forward at a time, in arrival order, so runs interleave fairly
            if attention:
                self._recorder.arm()
            try:
                out = self.model(**model_inputs, past_key_values=cache,
                                 use_cache=True, logits_to_keep=0 if all_logits else 1)
                rows = self._recorder.take(self.num_layers) if attention else None
            finally:
                self._recorder.armed = False
        return out.logits[0].float().cpu(), None if rows is None else rows.float().cpu()

    def _begin_decode(self, token_id: int, cache: DynamicCache | KVCache, *, attention: bool,
                      seat: Seat | None) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        """A decode step of ``token_id``, begun; the call returned gives its logits and
        attention rows on the host. On a GPU the lean runner's step is queued now and runs
        while the host records the token before it (~0.3-1 ms a token of vocabulary math);
        elsewhere, and for a run's first step on a GPU (which captures the run's graph, ~30
        ms that would hold back the first token), the step runs in that call, after the token
        is shown."""
        if (isinstance(cache, KVCache) and self.device.type == "cuda"
                and self._fast.step_is_queued(cache, attention)):
            with self._steps, torch.inference_mode():  # the graph's tensors are inference ones
                logits, rows = self._fast.decode(token_id, cache, attention=attention)
            return lambda: (logits.cpu(), None if rows is None else rows.cpu())
        return lambda: self._forward([token_id], cache, all_logits=False, attention=attention,
                                     seat=seat)

    def _batched(self, cache: DynamicCache | KVCache) -> bool:
        """Whether this run's decode steps go through the step batcher."""
        return (self._batcher is not None and isinstance(cache, KVCache)
                and self._fast.steps_in_kernel(cache))

    def _new_cache(self, capacity: int) -> DynamicCache | KVCache:
        """A KV cache for one run: preallocated for the lean runner, else transformers' own.

        The lean runner takes token ids or ``inputs_embeds`` (how a vision engine splices
        images into a Llama text model); models it does not support use transformers' cache.
        """
        if self._fast is not None:
            return self._fast.new_cache(capacity)
        return DynamicCache(config=self.model.config)

    def _prefill(self, plan: Plan, cache: DynamicCache | KVCache, *, all_logits: bool,
                 attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's forward pass (a vision engine splices its images in here)."""
        if (isinstance(cache, KVCache) and not all_logits
                and len(plan.prompt_ids) > PACKED_MAX_STEPS and self._exact_pieces(plan)):
            return self._prefill_from(plan, cache, 0, attention=attention)
        return self._forward(plan.prompt_ids, cache, all_logits=all_logits, attention=attention,
                             prefill=plan.prefill)

    def _exact_pieces(self, plan: Plan) -> bool:
        """Whether this plan's prompt can run in pieces that give bit for bit one pass."""
        return self._fast is not None and self._fast.tails_match_whole_prefills(plan.prefill)

    def _prefill_from(self, plan: Plan, cache: KVCache, start: int, *, attention: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's positions from ``start`` on (the cache holds those before), last
        logits only, each piece run as a long prefill of the whole prompt runs it (so bit for
        bit one pass: ``_exact_pieces``, at least 2 positions a piece). While other runs are
        decoding, a long prompt runs in pieces of ``PREFILL_PIECE`` positions, each a turn at
        the step lock, so their steps go on between the pieces instead of stalling for all of
        it (~3.5 s for 2,000 tokens here); alone, in one piece (pieces cost time)."""
        ids = plan.prompt_ids
        step = (PREFILL_PIECE if self._batcher is not None and self._batcher.seated > 0
                else len(ids))
        bounds = list(range(start, len(ids), step))
        if len(ids) - bounds[-1] < 2 and len(bounds) > 1:
            bounds.pop()  # the last piece takes the stray position
        ends = bounds[1:] + [len(ids)]
        for first, end in zip(bounds, ends):
            logits, rows = self._forward(ids[first:end], cache, all_logits=False,
                                         attention=attention and end == len(ids),
                                         prefill=plan.prefill, as_long_prefill=True)
        return logits, rows

    def _prefill_or_reuse(self, plan: Plan, cache: DynamicCache | KVCache, *, all_logits: bool,
                          attention: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """``_prefill``, or from what earlier prefills kept (``prompt_cache.py``): a copy of the
        same prompt's, else the positions a kept prompt shares with this one and a prefill of
        the rest (``_prefill_tail``). Token ids alone, on the lean runner's cache, last logits
        only. The count says how many positions were copied."""
        kept = self.prompt_cache
        if (kept is None or all_logits or plan.extra is not None
                or not isinstance(cache, KVCache) or not kept.admits(len(plan.prompt_ids))):
            return (*self._prefill(plan, cache, all_logits=all_logits, attention=attention), 0)
        # How the prefill computed: the mode and, for the benchmarks' comparisons, which
        # attention and which float32 product.
        how = (plan.prefill, self._fast.prefill_attention_kernel, self._fast.onednn_linears)
        key = (plan.prompt_ids, how)
        length = len(plan.prompt_ids)
        entry = kept.lookup(key, attention)
        if entry is None:
            with kept.prefilling(key) as mine:  # runs of one new prompt prefill it once
                entry = None if mine else kept.lookup(key, attention)
                if entry is None:
                    logits, rows, shared, head = self._prefill_tail(plan, cache, how, attention)
                    # Keep the tail's positions; the head's stay shared with their entry.
                    own = KeptPositions(shared, cache.keys[:, :, shared:length].clone(),
                                        cache.values[:, :, shared:length].clone())
                    kept.keep(key, KeptPrefill((*head, own), length, logits.clone(),
                                               None if rows is None else rows.clone()))
                    return logits, rows, shared
        entry.restore(cache.keys, cache.values, length)
        cache.length = length
        rows = entry.rows.clone() if attention and entry.rows is not None else None
        return entry.logits.clone(), rows, length

    def _prefill_tail(self, plan: Plan, cache: KVCache, how: tuple[Any, ...], attention: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int,
                                 tuple[KeptPositions, ...]]:
        """The prompt's prefill from the first position no kept prompt shares with it, where
        the runner computes that tail bit for bit as a prefill of the whole prompt would
        (``FastLlama.tails_match_whole_prefills``; a tail of at least 2 positions); else all of
        it. Returns the logits, the attention rows, how many positions were copied and the
        kept spans they came from."""
        ids = plan.prompt_ids
        found = (self.prompt_cache.longest_shared(ids, how, limit=len(ids) - 2)
                 if self._exact_pieces(plan) else None)
        if found is None:
            return (*self._prefill(plan, cache, all_logits=False, attention=attention), 0, ())
        entry, shared = found
        entry.restore(cache.keys, cache.values, shared)
        cache.length = shared
        return (*self._prefill_from(plan, cache, shared, attention=attention), shared,
                entry.head(shared))

    def _token(self, token_id: int, logits: torch.Tensor, processed: torch.Tensor | None,
               settings: SampleSettings, position: int, token_type: TokenType,
               rows: torch.Tensor | None) -> Token:
        """Describe one token given the logits it was drawn from (raw and processed)."""
        # Vocabulary passes in numpy on views: right after a decode step the caches are cold,
        # and there each torch op (its dispatch, each index) costs tens of microseconds.
        logprobs = torch.log_softmax(logits, dim=-1).numpy()
        probs = np.exp(logprobs)
        raw, chosen = logits.numpy(), processed.numpy() if processed is not None else None
        raw_logprob = float(logprobs[token_id])
        top_k = (self._top_k(settings.top_k, probs, logprobs, chosen if chosen is not None
                             else probs) if settings.top_k else ())
        mean = rows.mean(dim=(0, 1)).tolist() if rows is not None else []
        # One pass: sum(p * log p). A -inf logit makes it nan (0 * -inf); nansum counts that 0.
        entropy = -float(np.dot(probs, logprobs))
        if not math.isfinite(entropy):
            entropy = -float(np.nansum(probs * logprobs))
        return Token(
            token_id=token_id, token_str=self.piece(token_id),
            prob=float(chosen[token_id]) if chosen is not None else math.exp(raw_logprob),
            top_k=top_k, attn_weights=tuple(mean), token_type=token_type,
            raw_prob=math.exp(raw_logprob), logprob=raw_logprob,
            rank=int(np.count_nonzero(raw > raw[token_id])) + 1,
            entropy=entropy, position=position,
            attention=AttentionDetail(rows.numpy().astype(np.float32))
            if rows is not None and settings.full_attention else None)

    def _top_k(self, k: int, probs: np.ndarray, logprobs: np.ndarray, chosen: np.ndarray
               ) -> tuple[Token, ...]:
        """The ``k`` most likely tokens by raw probability, each with its raw and chosen
        (processed) probability and log-probability."""
        ids = top_ids(probs, min(k, probs.size))
        return tuple(
            Token(token_id=i, token_str=self.piece(i), prob=p, token_type=TokenType.MODEL,
                  raw_prob=v, logprob=lp, rank=n + 1)
            for n, (i, v, p, lp) in enumerate(zip(ids.tolist(), probs[ids].tolist(),
                                                  chosen[ids].tolist(), logprobs[ids].tolist())))

    def _score_prompt(self, plan: Plan, logits: torch.Tensor) -> Iterator[Token]:
        """The prompt's tokens, each with the probability the model gave it (teacher forcing)."""
        first = plan.prompt_ids[0]
        yield Token(token_id=first, token_str=self.piece(first), prob=0.0,
                    token_type=TokenType.USER, position=0)
        for position in range(1, len(plan.prompt_ids)):
            yield self._token(plan.prompt_ids[position], logits[position - 1], None,
                              plan.settings, position, TokenType.USER, None)

    def _run(self, plan: Plan, cancelled: Callable[[], bool]) -> Iterator[Event]:
        """The step loop."""
        s = plan.settings
        rng = torch.Generator().manual_seed(s.rng_seed)
        cache = self._new_cache(len(plan.prompt_ids) + s.max_len)
        generated: list[int] = []
        finish, match = FinishReason.MAX_LEN, None
        # Prefill: the whole prompt in one pass (or a copy of the same prompt's last one);
        # logits for every position only when scoring.
        logits, rows, reused = self._prefill_or_reuse(
            plan, cache, all_logits=s.score_prompt, attention=s.return_attention and s.max_len > 0)
        if s.score_prompt:
            yield from self._score_prompt(plan, logits)
        last = logits[-1]
        # From here on a step of this run may meet other runs' steps (step_batcher.py).
        with self._batcher.decoding() if self._batched(cache) else nullcontext() as seat:
            for index in range(s.max_len):
                # 1. Stop promptly when the caller has gone away.
                if cancelled():
                    finish = FinishReason.CANCELLED
                    break
                # 2. Processors (masks, temperature, nucleus) turn raw logits into the sampling
                #    law. This vocabulary math runs on this thread alone (see threads.py).
                with one_thread():
                    processed = torch.softmax(plan.chain(last), dim=-1)
                    # 3. Pick: argmax when greedy, else a draw from the seeded generator.
                    token_id = argmax(processed) if s.greedy else draw(processed, rng)
                # 4. A stop token or EOS ends the run and is not part of the output.
                if token_id in plan.stop_ids or (s.stop_at_eos and token_id == self.eos_id):
                    finish = (FinishReason.STOP_TOKEN if token_id in plan.stop_ids
                              else FinishReason.EOS)
                    match = plan.stop_ids.get(token_id, self.piece(token_id))
                    break
                # 5. Feed the token back in, unless this was the last one: on a GPU the step
                #    runs while this thread records the token (_begin_decode).
                following = (self._begin_decode(token_id, cache, attention=s.return_attention,
                                                seat=seat) if index + 1 < s.max_len else None)
                # 6. Record the token with its raw and processed probabilities, top-k, attention.
                generated.append(token_id)
                with one_thread():
                    token = self._token(token_id, last, processed, s, len(plan.prompt_ids) + index,
                                        TokenType.MODEL, rows)
                yield token
                # 7. A stop string ends the run after the token that completed it.
                match = self._stop_string(generated, s.stop_strings)
                if match is not None:
                    finish = FinishReason.STOP_STRING
                    break
                # 8. The next step's logits and attention.
                if following is not None:
                    logits, rows = following()
                    last = logits[-1]
        yield RunSummary(model_name=self.name, num_prompt_tokens=len(plan.prompt_ids),
                         num_generated_tokens=len(generated), finish_reason=finish,
                         stop_match=match, notes=plan.notes, prefill=plan.prefill,
                         prefill_reused=reused > 0, prefill_reused_tokens=reused)

    def _stop_string(self, generated: list[int], stop_strings: tuple[str, ...]) -> str | None:
        """The first stop string the generated text now contains, if any."""
        if not stop_strings:
            return None
        # Only the tail can hold a new match: enough tokens for the longest string, plus slack.
        tail = self.detokenize(generated[-(max(map(len, stop_strings)) + 8):])
        return next((s for s in stop_strings if s in tail), None)
