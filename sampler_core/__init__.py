"""sampler_core: sample from a real local language model with per-token instrumentation.

Cheap to import: torch and transformers load only when an engine is first used.

    from sampler_core import LocalClient
    async for token in LocalClient().sampler.sample("Hello", max_len=5):
        print(token.token_str, token.prob, [t.token_str for t in token.top_k])
"""

from sampler_core.client import AsyncSampler, Client, LocalClient, SyncClient
from sampler_core.errors import (
    BudgetExceeded,
    Cancelled,
    ContextOverflow,
    EngineFailure,
    InvalidArgument,
    InvalidImage,
    InvalidInput,
    InvalidSettings,
    Overloaded,
    SamplerError,
    ServerUnavailable,
    Unauthenticated,
    UnknownModel,
)
from sampler_core.settings import SampleSettings
from sampler_core.tokens import AttentionDetail, FinishReason, RunSummary, Token, TokenType

__version__ = "0.1.0"

__all__ = [
    "AsyncSampler", "AttentionDetail", "BudgetExceeded", "Cancelled", "Client", "ContextOverflow",
    "EngineFailure", "FinishReason", "InvalidArgument", "InvalidImage", "InvalidInput",
    "InvalidSettings", "LocalClient", "Overloaded", "RunSummary", "SampleSettings",
    "SamplerError", "ServerUnavailable", "SyncClient", "Token", "TokenType", "Unauthenticated",
    "UnknownModel",
]
