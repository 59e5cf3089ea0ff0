"""Backends: what the UI, CLI and API talk to (see `base.Backend`): `LocalBackend` runs our engine on a
`glmapp.host.ModelHost` in this process; `RemoteBackend` talks to any OpenAI-compatible server."""

from glmapp.backends.base import Backend, Capabilities, ChatUpdate, ModelInfo, ReloadResult, format_bytes
from glmapp.backends.handle import RequestHandle
from glmapp.backends.local import LocalBackend

__all__ = ["Backend", "Capabilities", "ChatUpdate", "LocalBackend", "ModelInfo", "ReloadResult",
           "RequestHandle", "format_bytes"]
