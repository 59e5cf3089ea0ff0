"""Exceptions a user can cause. Each says what was expected, what was found and what to do.

The CLI and UI catch `GlmappError` and show its message; anything else is a bug. Each class has a stable
`code`: the web app shows the translation of `error.<code>` (glmapp/ui/locales) in the reader's language,
while logs, the CLI and the API keep the English message.
"""


class GlmappError(Exception):
    """Base class of every user-facing error in glmapp."""

    code = "error"


class CheckpointError(GlmappError):
    """A model path, hub id, config or weight file cannot be used."""

    code = "checkpoint"


class TokenizerError(CheckpointError):
    """A tokenizer file is missing or is not a SentencePiece model."""

    code = "tokenizer"


class InputError(GlmappError):
    """A query or request the model cannot take (empty, malformed)."""

    code = "input"


class InputTooLong(InputError):
    """A prompt that does not fit the context even after dropping history."""

    code = "input_too_long"


class AdapterError(GlmappError):
    """A LoRA adapter cannot be listed, loaded, applied or merged."""

    code = "adapter"


class QuantizationError(GlmappError):
    """A quantization mode is unknown, unavailable here, or does not fit the checkpoint."""

    code = "quantization"


class EngineStopped(GlmappError, RuntimeError):
    """The engine thread is shut down or died of an internal error: it takes no more requests."""

    code = "engine_stopped"


class ModelReloading(GlmappError):
    """A request arrived while the model is being reloaded (the old one is already freed)."""

    code = "model_reloading"


class ModelLoading(ModelReloading):
    """A request arrived while the server's first model load still runs in the background (the page and the
    API answer before the model is ready)."""

    code = "model_loading"


class ModelLoadFailed(ModelReloading):
    """The background load of the served model failed; the message says why and how to fix it."""

    code = "model_load_failed"


class Unavailable(GlmappError):
    """The backend cannot do this (e.g. switch quantization on a remote server); the message says why."""

    code = "unavailable"
