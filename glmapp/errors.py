"""Exceptions a user can cause. Each says what was expected, what was found and what to do.

The CLI and UI catch `GlmappError` and show its message; anything else is a bug.
"""


class GlmappError(Exception):
    """Base class of every user-facing error in glmapp."""


class CheckpointError(GlmappError):
    """A model path, hub id, config or weight file cannot be used."""


class TokenizerError(CheckpointError):
    """A tokenizer file is missing or is not a SentencePiece model."""


class InputError(GlmappError):
    """A query or request the model cannot take (empty, malformed)."""


class InputTooLong(InputError):
    """A prompt that does not fit the context even after dropping history."""


class AdapterError(GlmappError):
    """A LoRA adapter cannot be listed, loaded, applied or merged."""


class QuantizationError(GlmappError):
    """A quantization mode is unknown, unavailable here, or does not fit the checkpoint."""


class EngineStopped(GlmappError, RuntimeError):
    """The engine thread is shut down or died of an internal error: it takes no more requests."""


class ModelReloading(GlmappError):
    """A request arrived while the model is being reloaded (the old one is already freed)."""


class Unavailable(GlmappError):
    """The backend cannot do this (e.g. switch quantization on a remote server); the message says why."""
