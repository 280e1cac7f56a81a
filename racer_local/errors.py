"""Exceptions a caller can act on; the CLI turns each into a one-line message."""


class RacerError(Exception):
    """Base class: every error racer-local raises on purpose."""


class ModelError(RacerError):
    """The model file is missing, not a GGUF, truncated, or llama.cpp refused it."""


class ContextFullError(RacerError):
    """The prompt (or prompt plus draft) does not fit in the context window."""


class RpcError(RacerError):
    """An RPC worker is unreachable or incompatible, or llama.cpp was built without RPC."""


class DecodeError(RacerError):
    """llama_decode failed or was cancelled; the KV cache has been rolled back."""

    def __init__(self, message: str, *, cancelled: bool = False) -> None:
        super().__init__(message)
        self.cancelled = cancelled
