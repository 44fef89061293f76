"""One exception tree for the whole library.

Every error a caller can see is a :class:`SamplerError`. The gRPC server maps each class to a
status code in one table (``sampler_core.wire.convert``) and the remote client maps the status
back to the same class, so local and remote calls raise the same errors.
"""

from __future__ import annotations

from typing import Any


class SamplerError(Exception):
    """Base of every error raised by sampler_core."""

    #: Name of the gRPC status code this error travels as (see wire/convert.py).
    status: str = "INTERNAL"


class InvalidArgument(SamplerError):
    """A request field holds a value that is not allowed.

    The message names the field, the value and what is allowed.
    """

    status = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class InvalidSettings(InvalidArgument):
    """A SampleSettings field is out of range or of the wrong type."""


class InvalidInput(InvalidArgument):
    """A prompt part (text, token ids, image) cannot be used."""


class InvalidImage(InvalidInput):
    """An image part cannot be decoded or is too large."""


class ContextOverflow(InvalidArgument):
    """The prompt plus max_len does not fit the model's context window."""


class UnknownModel(SamplerError):
    """No model of that name or path is known."""

    status = "NOT_FOUND"


class Unauthenticated(SamplerError):
    """The API key is missing or wrong."""

    status = "UNAUTHENTICATED"


class BudgetExceeded(SamplerError):
    """The API key's token or request budget is spent."""

    status = "RESOURCE_EXHAUSTED"


class Overloaded(SamplerError):
    """The server is running as many requests as it is allowed to."""

    status = "RESOURCE_EXHAUSTED"


class Cancelled(SamplerError):
    """The request was cancelled before it finished."""

    status = "CANCELLED"


class EngineFailure(SamplerError):
    """The engine failed in a way that is not the caller's fault."""

    status = "INTERNAL"


class ServerUnavailable(SamplerError):
    """The remote server cannot be reached."""

    status = "UNAVAILABLE"


#: Every concrete class, by name: the wire layer sends the name so the client can rebuild it.
ERROR_CLASSES: dict[str, type[SamplerError]] = {
    cls.__name__: cls
    for cls in (
        SamplerError,
        InvalidArgument,
        InvalidSettings,
        InvalidInput,
        InvalidImage,
        ContextOverflow,
        UnknownModel,
        Unauthenticated,
        BudgetExceeded,
        Overloaded,
        Cancelled,
        EngineFailure,
        ServerUnavailable,
    )
}
