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
from glmapp.ui.render import safe_markdown

BASE = "none"  # dropdown value of the base model (no adapter)
BASE_LABEL = "none (base model)"


def cell(text) -> str:
    """Text from the file system or the hub, made inert for a Markdown table cell."""
    return safe_markdown(str(text)).replace("|", "\\|").replace("\n", " ") or "—"


def adapter_label(active: str | None) -> str:
    return BASE_LABEL if not active else active


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
    def choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs: the base model, every adapter in the folder, then loaded hub/path ones."""
        out = [(BASE_LABEL, BASE)]
        listed = set()
        for info in self.backend.list_adapters():
            listed.add(info.name)
            if info.name == BASE:
                continue  # a folder named like the base entry cannot be chosen; the table says so
            out.append((info.name if info.error is None else f"{info.name} (unavailable)", info.name))
        out += [(f"{name} (loaded)", name) for name in self.backend.loaded_adapters() if name not in listed]
        return out

    def table(self, active: str | None = None) -> str:
        """Markdown table of the adapters with base model, rank, alpha, target modules, size and status."""
        infos = self.backend.list_adapters()
        loaded = set(self.backend.loaded_adapters())
        if not infos and not loaded:
            return (f"No adapters in `{cell(self.backend.adapters_dir)}/`. Put PEFT LoRA folders "
                    f"(`adapter_config.json` + `adapter_model.safetensors`) there and press Refresh, "
                    f"or load one by hub id below.")
        rows = ["| Adapter | Base model | Rank | Alpha | Target modules | Size | Status |",
                "|---|---|---|---|---|---|---|"]
        for info in infos:
            if info.name == BASE:
                status = f"unavailable: the name {BASE!r} is reserved for the base model; rename the folder"
            elif info.error:
                status = f"unavailable: {info.error}"
            else:
                status = "loaded" if info.name in loaded else "not loaded yet"
            if info.name == active:
                status += " · **active in this tab**"
            rows.append(f"| {cell(info.name)} | {cell(info.base_model)} | {info.r or '—'} | {info.alpha or '—'} | "
                        f"{cell(', '.join(info.target_modules))} | "
                        f"{format_bytes(info.size_bytes) if info.size_bytes else '—'} | {cell(status)} |")
        for name in sorted(loaded - {i.name for i in infos}):
            status = "loaded (hub id or path)" + (" · **active in this tab**" if name == active else "")
            rows.append(f"| {cell(name)} | | | | | | {status} |")
        return "\n".join(rows)

    @staticmethod
    def next_reply(active: str | None) -> str:
        """The chat stats line right after a change of adapter."""
        return f"{'adapter ' + cell(active) if active else 'base model'} selected · the next reply uses it"

    def status(self, active: str | None) -> str:
        return f"Active in this tab: **{cell(adapter_label(active))}**"

    # ---- actions (each returns the new session choice first) ------------------------------------------
    def select(self, choice, active: str | None) -> tuple[str | None, str]:
        """A dropdown pick -> (new choice for this session, status). A failing load keeps `active`."""
        choice = (choice or BASE).strip()
        if choice == BASE:
            return None, self.status(None)
        if choice == active and choice in self.backend.loaded_adapters():
            return active, self.status(active)
        broken = {i.name: i.error for i in self.backend.list_adapters() if i.error}
        if choice in broken:
            return self._refuse(choice, broken[choice], active)
        return self._load(choice, active, reload=False)

    def load_spec(self, spec, active: str | None) -> tuple[str | None, str]:
        """"Load by hub id or path": (re)load it and make it this session's choice."""
        spec = (spec or "").strip()
        if not spec:
            return self._refuse("", "type a folder name inside the adapters folder or a hub id (owner/name).",
                                active)
        if spec == BASE:
            return None, self.status(None)
        return self._load(spec, active, reload=True, download=self.download)

    def _load(self, spec: str, active: str | None, reload: bool, download=None) -> tuple[str | None, str]:
        try:
            info = self.backend.load_adapter(spec, reload=reload, download=download)
        except GlmappError as e:  # AdapterError, or the model is reloading
            return self._refuse(spec, str(e), active)
        notices.info(f"Adapter {info.name} is active in this tab (rank {info.r}, alpha {info.alpha:g}); "
                f"the next reply uses it.")
        return info.name, self.status(info.name)

    def _refuse(self, spec: str, why: str, active: str | None) -> tuple[str | None, str]:
        message = (f"Could not load adapter {spec!r}: {why} Still using {adapter_label(active)}."
                   if spec else f"No adapter given: {why}")
        notices.warning(message)
        return active, f"⚠️ {cell(message)}\n\n{self.status(active)}"


def dropdown_value(active: str | None) -> str:
    return active or BASE
