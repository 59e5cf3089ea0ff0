"""Model panel handlers: facts about the served model and a dtype reload that keeps the old model on failure."""

from __future__ import annotations

import gradio as gr

from glmapp.errors import GlmappError


def model_info_markdown(manager) -> str:
    return manager.info().as_markdown() + f"\n\nMemory in use: {manager.memory()}"


def demo_banner(manager) -> str:
    if not manager.demo:
        return ""
    why = f"\n\nWhy: {manager.notice}" if manager.notice else ""
    return ("⚠️ **Demo checkpoint: tiny model with random weights, so replies are gibberish.** Everything else "
            "works for real. To chat with ChatGLM2-6B, download it once with "
            "`huggingface-cli download THUDM/chatglm2-6b` and restart `python app.py`, or point the app at a "
            "checkpoint folder with `python app.py --model PATH`." + why)


def reload_model(manager, dtype: str, progress=None) -> str:
    """Reload in `dtype`; returns the new model info. On failure the previous model keeps serving."""
    report = (lambda fraction, desc: progress(fraction, desc=desc)) if progress is not None else None
    try:
        manager.reload(dtype, report)
    except GlmappError as e:
        raise gr.Error(f"Reload failed, still serving the previous model ({manager.info().dtype}): {e}") from None
    except (RuntimeError, MemoryError) as e:  # e.g. CUDA out of memory while the new copy loads
        raise gr.Error(f"Reload failed, still serving the previous model ({manager.info().dtype}): "
                       f"{type(e).__name__}: {e}") from None
    gr.Info(f"Reloaded as {manager.info().dtype}; your chat history is kept.")
    return model_info_markdown(manager)
