"""Which generations each browser session has running, so Stop and a closed tab can cancel them."""

from __future__ import annotations

import threading
from collections import defaultdict


def session_id(request) -> str:
    """Gradio's per-tab session hash; plain callers (tests, scripts) share the id "local"."""
    return getattr(request, "session_hash", None) or "local"


class ActiveRequests:
    def __init__(self):
        self._lock = threading.Lock()
        self._handles: dict[str, set] = defaultdict(set)

    def track(self, sid: str):
        """An `on_handle` callback for `chat_stream` that records the handle under `sid`."""
        def on_handle(handle):
            with self._lock:
                self._handles[sid].add(handle)
        return on_handle

    def done(self, sid: str, handle) -> None:
        with self._lock:
            self._handles[sid].discard(handle)
            if not self._handles[sid]:
                self._handles.pop(sid, None)

    def cancel(self, sid: str) -> int:
        """Cancel every generation of the session; returns how many were running."""
        with self._lock:
            handles = list(self._handles.pop(sid, ()))
        for handle in handles:
            handle.cancel()
        return len(handles)

    def running(self, sid: str) -> int:
        with self._lock:
            return len(self._handles.get(sid, ()))
