"""Model panel handlers: facts about the served model, and a reload that frees the old model first."""

from __future__ import annotations

from glmapp import commands
from glmapp.errors import GlmappError
from glmapp.backends import ReloadResult
from glmapp.host import ReloadFailed
from glmapp.ui import notices
from glmapp.ui.i18n import ENGLISH, error_text, t


def model_info_markdown(backend, lang: str = ENGLISH) -> str:
    try:
        info = backend.info().as_markdown(lambda row: t(f"model.row.{row}", lang),
                                           lambda key, **values: t(f"model.value.{key}", lang, **values))
    except GlmappError as e:  # the model is being reloaded
        return error_text(e, lang)
    return info + "\n\n" + t("model.memory", lang, memory=backend.memory())


def current_quant(backend) -> str | None:
    """The served quantization mode; None while the model loads or reloads."""
    try:
        return backend.info().quant
    except GlmappError:
        return None


def capabilities_note(caps, lang: str = ENGLISH) -> str:
    """What this backend cannot do, with why (the controls for it are disabled)."""
    return "\n".join("- " + t("model.unavailable", lang, what=t(f"model.capability.{k}", lang), why=why)
                     for k, why in caps.unavailable().items())


def demo_banner(backend, lang: str = ENGLISH) -> str:
    if not backend.demo:
        return ""
    why = "\n\n" + t("banner.why", lang, notice=backend.notice) if backend.notice else ""
    return t("banner.demo", lang, download=commands.download(), run=commands.RUN_APP,
             run_with_model=commands.RUN_APP_WITH_MODEL) + why


def quant_choices(backend, lang: str = ENGLISH) -> list[tuple[str, str]]:
    """(label, value) per quantization mode; one that cannot run here is marked with the reason (the
    dropdown cannot disable single entries, and choosing one is refused with that reason)."""
    from glmapp.choices import QUANT_MODES as MODES

    try:
        reasons = backend.quant_choices()
    except GlmappError as e:  # being reloaded, or a backend that cannot switch (it says why)
        reasons = {mode: error_text(e, lang) for mode in MODES}
    return [(mode if reasons.get(mode) is None else t("model.quant_unavailable", lang, mode=mode, why=reasons[mode]),
             mode) for mode in MODES]


def switch_quantization(backend, mode: str, progress=None, lang: str = ENGLISH) -> str:
    """Free the model, load it in quantization `mode`, re-apply adapters; returns the new model info.

    An unavailable mode is refused before anything is freed; if loading fails, the previous mode is
    loaded again and the error shown."""
    report = (lambda fraction, desc: progress(fraction, desc=desc)) if progress is not None else None
    try:
        result = backend.quantize(mode, report)
    except ReloadFailed as e:
        raise notices.error(f"{e} Adapters: {adapters_note(e.result).strip(' ()') or 'none'}.") from None
    except GlmappError as e:
        raise notices.error(t("model.quant_failed", lang, mode=repr(mode), error=error_text(e, lang))) from None
    except (RuntimeError, MemoryError) as e:  # the previous mode could not be loaded again either
        raise notices.error(f"Switching to {mode!r} failed and the previous model could not be loaded again: "
                            f"{type(e).__name__}: {e}. Restart the app.") from None
    _warn_dropped(result)
    notices.info(t("model.quant_done", lang, mode=result.info.quant, adapters=adapters_note(result)))
    return model_info_markdown(backend, lang)


def reload_model(backend, dtype: str, progress=None, lang: str = ENGLISH) -> str:
    """Free the model, load it in `dtype`, re-apply resident adapters; returns the new model info.

    On failure the previous dtype is loaded again and the error is shown; chat histories live in the
    browser and are unaffected either way."""
    report = (lambda fraction, desc: progress(fraction, desc=desc)) if progress is not None else None
    try:
        result = backend.reload(dtype, report)
    except ReloadFailed as e:
        raise notices.error(f"Reload as {dtype} failed: {e}. The previous model was loaded again "
                            f"({e.result.info.dtype}){adapters_note(e.result)}.") from None
    except GlmappError as e:
        raise notices.error(t("model.reload_failed", lang, error=error_text(e, lang))) from None
    except (RuntimeError, MemoryError) as e:  # even the previous model could not be loaded again
        raise notices.error(f"Reload failed and the previous model could not be loaded again: "
                            f"{type(e).__name__}: {e}. Restart the app.") from None
    _warn_dropped(result)
    notices.info(t("model.reload_done", lang, dtype=result.info.dtype, adapters=adapters_note(result)))
    return model_info_markdown(backend, lang)


def _warn_dropped(result: ReloadResult) -> None:
    if result.dropped:
        notices.warning("Could not re-apply to the reloaded model: " +
                        "; ".join(f"{name} ({why})" for name, why in result.dropped.items()))


def adapters_note(result: ReloadResult) -> str:
    parts = []
    if result.reapplied:
        parts.append("adapters re-applied: " + ", ".join(result.reapplied))
    if result.dropped:
        parts.append("not re-applied: " + ", ".join(result.dropped))
    return f" ({'; '.join(parts)})" if parts else ""
