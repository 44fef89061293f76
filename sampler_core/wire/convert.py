"""Proto messages <-> the library's frozen dataclasses, and errors <-> gRPC status codes.

Nothing outside ``wire/`` sees a protobuf: requests become ``PromptPart``s and
``SampleSettings`` here, and engine events become messages here. Extension fields (numbers
from 100 up) carry what the SDK's protocol lacks, at full precision, so a remote run returns
exactly the tokens an in-process run does.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any, Iterable, Sequence

import grpc
import numpy as np

from sampler_core.errors import (
    ERROR_CLASSES,
    BudgetExceeded,
    Cancelled,
    EngineFailure,
    InvalidArgument,
    InvalidInput,
    SamplerError,
    ServerUnavailable,
    Unauthenticated,
    UnknownModel,
)
from sampler_core.inputs import (
    MAX_TEXT_CHARS,
    ImagePart,
    PromptPart,
    TextPart,
    TokenIdsPart,
    decode_base64_image,
    image_part,
    to_parts,
)
from sampler_core.settings import InputToken, SampleSettings
from sampler_core.tokens import AttentionDetail, FinishReason, RunSummary, Token, TokenType
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from sampler_core.wire.accounts import TokenBudget, Transaction

#: Trailing metadata key naming the exact error class, so the client rebuilds it.
ERROR_CLASS_KEY = "x-sampler-error"
#: Trailing metadata key naming the request field an InvalidArgument is about.
ERROR_FIELD_KEY = "x-sampler-field"
UINT32_MAX = 2**32 - 1

# ----- errors ----------------------------------------------------------------------------------

#: The one table: each error class -> the status code it travels as (from its ``status``).
STATUS_CODES: dict[type[SamplerError], grpc.StatusCode] = {
    cls: getattr(grpc.StatusCode, cls.status) for cls in ERROR_CLASSES.values()
}

#: A status from a server that sends no class name (a foreign server) -> the class to raise.
CLASS_FOR_CODE: dict[grpc.StatusCode, type[SamplerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: UnknownModel,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailable,
}


def error_status(exc: SamplerError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, details, trailing metadata) for an error the server sends."""
    metadata: tuple[tuple[str, str], ...] = ((ERROR_CLASS_KEY, type(exc).__name__),)
    field = getattr(exc, "field", None)
    if field:
        metadata += ((ERROR_FIELD_KEY, str(field)),)
    return STATUS_CODES.get(type(exc), grpc.StatusCode.INTERNAL), str(exc), metadata


def error_from_status(code: grpc.StatusCode, details: str,
                      trailing: Iterable[tuple[str, Any]] | None) -> SamplerError:
    """The exception a client raises for a failed call: the sent class, else by status code."""
    meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (trailing or ())}
    cls = ERROR_CLASSES.get(meta.get(ERROR_CLASS_KEY, ""))
    if cls is None:
        cls = CLASS_FOR_CODE.get(code, EngineFailure)
        if cls is ServerUnavailable or cls is EngineFailure:
            details = f"{code.name}: {details}"
    if issubclass(cls, InvalidArgument):
        return cls(details, field=meta.get(ERROR_FIELD_KEY))
    return cls(details)


def error_from_rpc(exc: grpc.RpcError) -> SamplerError:
    """Convert a grpc error (``grpc.aio.AioRpcError``) to our exception tree."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return error_from_status(exc.code(), exc.details() or "", trailing)


# ----- requests --------------------------------------------------------------------------------


def _input_token_to_proto(token: InputToken) -> pb.InputToken:
    if isinstance(token, int):
        if token > UINT32_MAX:
            raise InvalidInput(f"token id {token} does not fit the wire's uint32 (0..{UINT32_MAX})",
                               field="token_id", value=token)
        return pb.InputToken(token_id=token)
    return pb.InputToken(string_token=token)


def _input_token_from_proto(token: pb.InputToken) -> InputToken:
    kind = token.WhichOneof("token")
    if kind == "token_id":
        return int(token.token_id)
    return token.string_token  # an unset entry reads as "", which settings reject by name


def settings_to_proto(settings: SampleSettings) -> pb.SampleSettings:
    """Our settings as the wire's, exact values in the extension fields."""
    return pb.SampleSettings(
        max_len=settings.max_len, temperature=settings.temperature,
        nucleus_p=settings.nucleus_p, stop_tokens=settings.stop_tokens,
        rng_seed=settings.rng_seed,
        allowed_tokens=[_input_token_to_proto(t) for t in settings.allowed_tokens],
        stop_strings=settings.stop_strings,
        disallowed_tokens=[_input_token_to_proto(t) for t in settings.disallowed_tokens],
        top_k=settings.top_k, full_attention=settings.full_attention,
        score_prompt=settings.score_prompt, stop_at_eos=settings.stop_at_eos,
        temperature_exact=settings.temperature, nucleus_p_exact=settings.nucleus_p,
        prefill=settings.prefill)


def settings_from_proto(msg: pb.SampleSettings | None, return_attention: bool) -> SampleSettings:
    """The wire's settings -> validated SampleSettings (InvalidSettings names the field).

    A request without settings gets the library's defaults; absent extension fields too.
    """
    if msg is None:
        return SampleSettings(return_attention=return_attention)
    defaults = SampleSettings()
    return SampleSettings(
        max_len=msg.max_len,
        temperature=msg.temperature_exact if msg.HasField("temperature_exact") else msg.temperature,
        nucleus_p=msg.nucleus_p_exact if msg.HasField("nucleus_p_exact") else msg.nucleus_p,
        stop_tokens=tuple(msg.stop_tokens), rng_seed=msg.rng_seed,
        allowed_tokens=tuple(_input_token_from_proto(t) for t in msg.allowed_tokens),
        stop_strings=tuple(msg.stop_strings),
        disallowed_tokens=tuple(_input_token_from_proto(t) for t in msg.disallowed_tokens),
        top_k=msg.top_k if msg.HasField("top_k") else defaults.top_k,
        return_attention=return_attention, full_attention=msg.full_attention,
        score_prompt=msg.score_prompt,
        stop_at_eos=msg.stop_at_eos if msg.HasField("stop_at_eos") else defaults.stop_at_eos,
        prefill=msg.prefill)


def parts_to_proto(parts: Sequence[PromptPart]) -> list[pb.PromptInput]:
    """Prompt parts as the wire's PromptInputs (images travel as raw bytes)."""
    out: list[pb.PromptInput] = []
    for position, part in enumerate(parts):
        if isinstance(part, TextPart):
            out.append(pb.PromptInput(text=part.text))
        elif isinstance(part, TokenIdsPart):
            for token_id in part.ids:
                if token_id > UINT32_MAX:
                    raise InvalidInput(
                        f"inputs[{position}]: token id {token_id} does not fit the wire's uint32",
                        field=f"inputs[{position}]", value=token_id)
            out.append(pb.PromptInput(token_ids=pb.TokenIds(tokens=part.ids)))
        elif isinstance(part, ImagePart):
            out.append(pb.PromptInput(image_bytes=part.data))
    return out


def _text_part(text: str, position: int) -> TextPart:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInput(
            f"inputs[{position}]: text is {len(text)} characters; at most {MAX_TEXT_CHARS}",
            field=f"inputs[{position}]", value=len(text))
    return TextPart(text)


def parts_from_proto(inputs: Sequence[pb.PromptInput],
                     prompt: Sequence[int] = ()) -> tuple[PromptPart, ...]:
    """The request's ``inputs`` (or the deprecated ``prompt`` ids) -> validated parts."""
    parts: list[PromptPart] = []
    for position, item in enumerate(inputs):
        kind = item.WhichOneof("payload")
        if kind == "text":
            parts.append(_text_part(item.text, position))
        elif kind == "image_bytes":
            parts.append(image_part(item.image_bytes, position=position))
        elif kind == "image_base64":
            parts.append(decode_base64_image(item.image_base64, position=position))
        elif kind == "token_ids":
            parts.append(TokenIdsPart(tuple(item.token_ids.tokens)))
        else:
            raise InvalidInput(f"inputs[{position}]: no payload set (expected text, image_bytes, "
                               "image_base64 or token_ids)", field=f"inputs[{position}]", value=None)
    if not parts and prompt:
        parts.append(TokenIdsPart(tuple(prompt)))
    return to_parts("", parts)


# ----- responses -------------------------------------------------------------------------------


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _logit(token: Token) -> pb.Logit:
    logit = pb.Logit(token_id=token.token_id, string_token=token.token_str, prob=token.prob,
                     prob_exact=token.prob)
    if token.raw_prob is not None:
        logit.raw_prob = token.raw_prob
    if token.logprob is not None:
        logit.logprob = token.logprob
    if token.rank is not None:
        logit.rank = token.rank
    return logit


def token_to_proto(token: Token) -> pb.Token:
    """A Token as the wire's (own id/text/prob in final_logit, alternatives as Logits)."""
    msg = pb.Token(final_logit=_logit(token), token_type=int(token.token_type),
                   top_k=[_logit(t) for t in token.top_k], attention=token.attn_weights)
    if token.entropy is not None:
        msg.entropy = token.entropy
    if token.position is not None:
        msg.position = token.position
    if token.attention is not None:
        w = np.ascontiguousarray(token.attention.weights, dtype=np.float32)
        msg.full_attention.num_layers = int(w.shape[0])
        msg.full_attention.num_heads = int(w.shape[1])
        msg.full_attention.weights.extend(w.ravel().tolist())
    return msg


def _token_type(value: int) -> TokenType:
    try:
        return TokenType(value)
    except ValueError:
        return TokenType.UNKNOWN


def _from_logit(logit: pb.Logit, token_type: TokenType, **extra: Any) -> Token:
    prob = logit.prob_exact if logit.HasField("prob_exact") else float(logit.prob)
    return Token(token_id=logit.token_id, token_str=logit.string_token, prob=prob,
                 token_type=token_type, raw_prob=_opt(logit, "raw_prob"),
                 logprob=_opt(logit, "logprob"), rank=_opt(logit, "rank"), **extra)


def token_from_proto(msg: pb.Token) -> Token:
    """The wire's Token -> ours; fields an old server does not send stay None."""
    attention = None
    if msg.HasField("full_attention") and msg.full_attention.num_layers:
        fa = msg.full_attention
        attention = AttentionDetail(np.asarray(fa.weights, dtype=np.float32).reshape(
            fa.num_layers, fa.num_heads, -1))
    return _from_logit(
        msg.final_logit, _token_type(msg.token_type),
        top_k=tuple(_from_logit(t, TokenType.MODEL) for t in msg.top_k),
        attn_weights=tuple(msg.attention), entropy=_opt(msg, "entropy"),
        position=_opt(msg, "position"), attention=attention)


def summary_to_proto(summary: RunSummary) -> pb.RunSummary:
    """How a run ended, for the wire."""
    msg = pb.RunSummary(model_name=summary.model_name, num_prompt_tokens=summary.num_prompt_tokens,
                        num_generated_tokens=summary.num_generated_tokens,
                        finish_reason=summary.finish_reason.value, notes=summary.notes,
                        prefill=summary.prefill, prefill_reused=summary.prefill_reused,
                        prefill_reused_tokens=summary.prefill_reused_tokens)
    if summary.stop_match is not None:
        msg.stop_match = summary.stop_match
    return msg


def summary_from_proto(msg: pb.RunSummary) -> RunSummary:
    """The wire's RunSummary -> ours (an unknown finish reason reads as max_len)."""
    try:
        finish = FinishReason(msg.finish_reason)
    except ValueError:
        finish = FinishReason.MAX_LEN
    return RunSummary(model_name=msg.model_name, num_prompt_tokens=msg.num_prompt_tokens,
                      num_generated_tokens=msg.num_generated_tokens, finish_reason=finish,
                      stop_match=_opt(msg, "stop_match"), notes=tuple(msg.notes),
                      prefill=msg.prefill, prefill_reused=msg.prefill_reused,
                      prefill_reused_tokens=msg.prefill_reused_tokens)


def budget_to_proto(budget: TokenBudget) -> pb.TokenBudget:
    return pb.TokenBudget(token_limit=budget.token_limit, tokens_spent=budget.tokens_spent,
                          request_limit=budget.request_limit, requests_spent=budget.requests_spent)


def budget_from_proto(msg: pb.TokenBudget) -> TokenBudget:
    return TokenBudget(msg.token_limit, msg.tokens_spent, msg.request_limit, msg.requests_spent)


def transaction_to_proto(tx: Transaction) -> pb.TokenTransaction:
    msg = pb.TokenTransaction(
        num_prompt_tokens=tx.num_prompt_tokens, num_generated_tokens=tx.num_generated_tokens,
        cost_multiplier=tx.cost_multiplier, transaction_type=tx.transaction_type,
        transaction_id=tx.transaction_id, model_name=tx.model_name, confirmed=tx.confirmed)
    msg.create_time.FromDatetime(tx.create_time)
    return msg


def transaction_from_proto(msg: pb.TokenTransaction) -> Transaction:
    return Transaction(
        transaction_id=msg.transaction_id, transaction_type=msg.transaction_type,
        model_name=msg.model_name, num_prompt_tokens=msg.num_prompt_tokens,
        num_generated_tokens=msg.num_generated_tokens,
        create_time=msg.create_time.ToDatetime(tzinfo=timezone.utc),
        cost_multiplier=msg.cost_multiplier, confirmed=msg.confirmed)
