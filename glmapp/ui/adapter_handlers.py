"""Adapter picker handlers: list LoRA adapters with metadata, choose one per browser session, load by hub id/path.

Notable choices:
- The choice belongs to the browser session: it lives in a `gr.State` (None = base model) and is
  passed as `adapter=` with each request. Loading makes an adapter resident on the shared model, but
  another session's replies change only if that session picks it too.
- Loaded adapters stay resident, so switching back and forth is instant.
- Only "Load by hub id" may download (adapter files only, size-capped, see `glmapp.adapter_hub`), and
  not for anonymous visitors of an app others can reach (`hub_downloads`); the download does not hold
  the adapter lock, so other tabs keep switching adapters meanwhile.
- A load that fails (bad files, escape attempt, hub id not found) shows a warning and the previous
  choice stays active. Gradio's dropdown cannot disable single entries, so adapters whose metadata
  already shows an error are listed marked "unavailable" (the reason is in the table) and refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from glmapp import adapter_hub
from glmapp.errors import AdapterError, GlmappError
from glmapp.backends import format_bytes
from glmapp.ui import notices
from glmapp.ui.i18n import ENGLISH, error_text, t
from glmapp.ui.render import safe_markdown

BASE = "none"  # dropdown value of the base model (no adapter)
BASE_LABEL = t("adapter.base_label")  # in English; the page shows adapter_label(None, lang)


def cell(text) -> str:
    """Text from the file system or the hub, made inert for a Markdown table cell."""
    return safe_markdown(str(text)).replace("|", "\\|").replace("\n", " ") or "—"


def adapter_label(active: str | None, lang: str = ENGLISH) -> str:
    return t("adapter.base_label", lang) if not active else active


def refuse_downloads(why: str) -> Callable[[str], Path]:
    """A `download` that fetches nothing and says why (adapters already in the Hugging Face cache still load)."""
    def refuse(repo_id: str) -> Path:
        raise AdapterError(f"{repo_id!r} is not in the Hugging Face cache, and {why}")
    return refuse


def hub_downloads(config) -> Callable[[str], Path]:
    """How "Load by hub id" fetches a hub id for this app: anyone on an app only this machine reaches, only
    logged-in users (--auth) on an app others reach; never anonymous visitors of a public link or address."""
    public = config.share or config.host not in ("127.0.0.1", "localhost", "::1")
    if public and not (config.auth or config.auth_file):
        return refuse_downloads("this app is reachable by others without a login (--share or --host without "
                                "--auth), so visitors cannot make it download from the hub. Put the adapter in "
                                "the adapters folder, or restart with --auth USER:PASS.")
    return adapter_hub.download


class AdapterHandlers:
    def __init__(self, backend, download: Callable[[str], Path] | None = None):
        """`download(repo_id) -> folder` fetches hub ids typed in "Load by hub id" (see `hub_downloads`);
        None: only adapters already in the Hugging Face cache load by hub id."""
        self.backend = backend
        self.download = download or refuse_downloads("downloads from the hub are off in this app.")

    # ---- what is shown ------------------------------------------------------------------------------
    def choices(self, lang: str = ENGLISH) -> list[tuple[str, str]]:
        """(label, value) pairs: the base model, every adapter in the folder, then loaded hub/path ones."""
        out = [(adapter_label(None, lang), BASE)]
        listed = set()
        for info in self.backend.list_adapters():
            listed.add(info.name)
            if info.name == BASE:
                continue  # a folder named like the base entry cannot be chosen; the table says so
            out.append((info.name if info.error is None else t("adapter.unavailable_label", lang, name=info.name),
                        info.name))
        out += [(t("adapter.loaded_label", lang, name=name), name) for name in self.backend.loaded_adapters()
                if name not in listed]
        return out

    def table(self, active: str | None = None, lang: str = ENGLISH) -> str:
        """Markdown table of the adapters with base model, rank, alpha, target modules, size and status."""
        infos = self.backend.list_adapters()
        loaded = set(self.backend.loaded_adapters())
        if not infos and not loaded:
            return t("adapter.none_in_folder", lang, folder=cell(self.backend.adapters_dir))
        rows = [t("adapter.table_header", lang),
                "|---|---|---|---|---|---|---|"]
        for info in infos:
            if info.name == BASE:
                status = t("adapter.reserved", lang, name=repr(BASE))
            elif info.error:
                status = t("adapter.unavailable", lang, why=info.error)
            else:
                status = t("adapter.loaded" if info.name in loaded else "adapter.not_loaded", lang)
            if info.name == active:
                status += " · " + t("adapter.active_here", lang)
            rows.append(f"| {cell(info.name)} | {cell(info.base_model)} | {info.r or '—'} | {info.alpha or '—'} | "
                        f"{cell(', '.join(info.target_modules))} | "
                        f"{format_bytes(info.size_bytes) if info.size_bytes else '—'} | {cell(status)} |")
        for name in sorted(loaded - {i.name for i in infos}):
            status = t("adapter.loaded_other", lang) + (" · " + t("adapter.active_here", lang) if name == active else "")
            rows.append(f"| {cell(name)} | | | | | | {status} |")
        return "\n".join(rows)

    @staticmethod
    def next_reply(active: str | None, lang: str = ENGLISH) -> str:
        """The chat stats line right after a change of adapter."""
        model = t("stats.adapter", lang, name=cell(active)) if active else t("stats.base_model", lang)
        return t("adapter.selected", lang, model=model)

    def status(self, active: str | None, lang: str = ENGLISH) -> str:
        return t("adapter.status", lang, name=cell(adapter_label(active, lang)))

    # ---- actions (each returns the new session choice first) ------------------------------------------
    def select(self, choice, active: str | None, lang: str = ENGLISH) -> tuple[str | None, str]:
        """A dropdown pick -> (new choice for this session, status). A failing load keeps `active`."""
        choice = (choice or BASE).strip()
        if choice == BASE:
            return None, self.status(None, lang)
        if choice == active and choice in self.backend.loaded_adapters():
            return active, self.status(active, lang)
        broken = {i.name: i.error for i in self.backend.list_adapters() if i.error}
        if choice in broken:
            return self._refuse(choice, broken[choice], active, lang)
        return self._load(choice, active, reload=False, lang=lang)

    def load_spec(self, spec, active: str | None, lang: str = ENGLISH) -> tuple[str | None, str]:
        """"Load by hub id or path": (re)load it and make it this session's choice."""
        spec = (spec or "").strip()
        if not spec:
            return self._refuse("", t("adapter.type_spec", lang), active, lang)
        if spec == BASE:
            return None, self.status(None, lang)
        return self._load(spec, active, reload=True, download=self.download, lang=lang)

    def _load(self, spec: str, active: str | None, reload: bool, download=None,
              lang: str = ENGLISH) -> tuple[str | None, str]:
        try:
            info = self.backend.load_adapter(spec, reload=reload, download=download)
        except GlmappError as e:  # AdapterError, or the model is reloading
            return self._refuse(spec, error_text(e, lang), active, lang)
        notices.info(t("adapter.activated", lang, name=info.name, r=info.r, alpha=f"{info.alpha:g}"))
        return info.name, self.status(info.name, lang)

    def _refuse(self, spec: str, why: str, active: str | None, lang: str = ENGLISH) -> tuple[str | None, str]:
        message = (t("adapter.refused", lang, spec=repr(spec), why=why, active=adapter_label(active, lang))
                   if spec else t("adapter.none_given", lang, why=why))
        notices.warning(message)
        return active, f"⚠️ {cell(message)}\n\n{self.status(active, lang)}"


def dropdown_value(active: str | None) -> str:
    return active or BASE
