"""Exceptions the engine raises; each carries a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``code`` matches the protocol's error codes."""

    code = "engine_error"


class InvalidInput(EngineError):
    code = "invalid_input"


class ModelNotFound(EngineError):
    code = "model_not_found"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class Cancelled(EngineError):
    code = "cancelled"
