"""glmapp: run, compare and serve ChatGLM2/ChatGLM3 models.

    model, tokenizer = glmapp.load("THUDM/chatglm2-6b")
    response, history = model.chat(tokenizer, "你好", history=[])

`import glmapp` imports neither torch nor transformers (the command line's `--help` must be instant): the
model classes below load on first use, and importing them registers the `chatglm` model type with
transformers' Auto classes.
"""

from __future__ import annotations

from glmapp.errors import CheckpointError, GlmappError, InputError, InputTooLong, QuantizationError, TokenizerError

__all__ = ["load", "ChatGLMConfig", "ChatGLMForConditionalGeneration", "GlmappError", "CheckpointError",
           "TokenizerError", "InputError", "InputTooLong", "QuantizationError"]
__version__ = "0.1.0"

_MODEL_CLASSES = ("ChatGLMConfig", "ChatGLMForConditionalGeneration")


def __getattr__(name: str):
    if name in _MODEL_CLASSES:
        import glmapp.chat  # noqa: F401 - registers the Auto classes
        from glmapp.models import chatglm

        return getattr(chatglm, name)
    raise AttributeError(f"module 'glmapp' has no attribute {name!r}")


def load(model: str, device: str | None = None, dtype: str = "auto", family: str | None = None,
         quant: str | None = None, progress=None):
    """Load a ChatGLM2/3 checkpoint (folder, Hugging Face cache or hub id) -> (model, tokenizer).

    The model has the official `chat` and `stream_chat` methods. Raises `CheckpointError` with what was
    looked for when nothing usable is found. `quant`: none, int8, int4, bnb-int8 or bnb-nf4 (see
    `glmapp.quant`); None loads the checkpoint as stored (a `quantization_bit: 4` checkpoint as int4).
    `progress(fraction, message, [detail])` hears about a download from the hub, then about the tensors read.
    """
    from glmapp.chat import ChatModel
    from glmapp.checkpoint import load_model, read_config, resolve
    from glmapp.tokenizer import ChatGLMTokenizer

    path = resolve(model, progress=progress).path
    # Tokenizer first: it is cheap, and a bad tokenizer file should fail before gigabytes are read.
    tokenizer = ChatGLMTokenizer.from_pretrained(path, family=family or read_config(path).family)
    net = load_model(path, device=device, dtype=dtype, model_cls=ChatModel, family=tokenizer.family,
                     quant=quant, progress=progress)
    return net, tokenizer
