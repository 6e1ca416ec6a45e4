"""Exceptions the engine raises; each carries a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``code`` matches the protocol's error codes."""

    code = "engine_error"


class InvalidInput(EngineError):
    code = "invalid_input"


class ModelNotFound(EngineError):
    """A model is not here. ``reason`` says what was looked for where, ``fix`` how to get it;
    the message is both (``reason; fix``), so a caller with a better fix can show its own."""

    code = "model_not_found"

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(f"{reason}; {fix}" if fix else reason)
        self.reason, self.fix = reason, fix


class OutOfMemory(EngineError):
    code = "out_of_memory"


class Cancelled(EngineError):
    code = "cancelled"
