"""The Backend protocol: what the web UI, the API and the CLI talk to, and the plain types it speaks.

Two implementations: `LocalBackend` (our engine on a `ModelHost` in this process) and `RemoteBackend` (any
OpenAI-compatible server: vLLM, another glmapp). Notable choices:
- Everything crossing the seam is a plain dataclass or a string: no torch module, tensor or tokenizer
  object. The one exception is token-level access (`submit` of prompt ids, `tokenizer`), offered only by a
  backend whose `capabilities().tokenization` is None (available); the API's raw-id paths check it.
- What a backend cannot do is not an exception path discovered by clicking: `capabilities()` says it
  up front, each entry None (available) or the reason it is not, and the UI shows that reason.
- Streams are iterators of `ChatUpdate` (chat level) or `Delta` (token level, in `glmapp.engine.request`):
  the last item has `finish_reason`; an error never raises out of the middle of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Protocol, runtime_checkable

from glmapp.engine.request import Usage


@dataclass(frozen=True)
class Capabilities:
    """Per feature: None when the backend has it, else the reason it does not (shown to users as is)."""

    quantization: str | None = None  # switch int8/int4/bnb modes by reloading
    dtype_switch: str | None = None  # reload in another dtype
    adapter_loading: str | None = None  # load adapters from the adapters folder, the hub or an upload
    training: str | None = None  # fine-tune adapters on this machine
    tokenization: str | None = None  # token-level access: prompt ids in, `tokenizer`

    def unavailable(self) -> dict[str, str]:
        return {f.name: why for f in fields(self) if (why := getattr(self, f.name)) is not None}


@dataclass
class ModelInfo:
    name: str
    family: str
    parameters: int
    dtype: str
    device: str
    weight_bytes: int
    context_length: int
    demo: bool
    quant: str = "none"
    backend: str = "local"  # "local", or the remote server's address

    # (row id, English label): the web page translates the labels by id (`model.row.<id>`), logs keep these.
    ROWS = (("model", "Model"), ("backend", "Served by"), ("family", "Family"), ("parameters", "Parameters"),
            ("dtype", "Dtype"), ("quant", "Quantization"), ("device", "Device"), ("weights", "Weights in memory"),
            ("context", "Context"), ("demo", "Demo checkpoint"))

    def rows(self, words=None) -> list[tuple[str, str]]:
        """(row id, value); `words(key, **values)` words the values that are text (English by default)."""
        words = words or (lambda key, **v: {"unknown": "unknown", "tokens": f"{v.get('n', '')} tokens",
                                            "demo_yes": "yes (random weights)", "demo_no": "no"}[key])
        rows = [("model", f"`{self.name}`"), ("backend", self.backend), ("family", self.family),
                ("parameters", f"{self.parameters / 1e6:,.1f} M" if self.parameters else words("unknown")),
                ("dtype", self.dtype), ("quant", self.quant), ("device", self.device),
                ("weights", format_bytes(self.weight_bytes) if self.weight_bytes else words("unknown")),
                ("context", words("tokens", n=f"{self.context_length:,}")),
                ("demo", words("demo_yes") if self.demo else words("demo_no"))]
        return [(k, v) for k, v in rows if k != "backend" or self.backend != "local"]

    def as_markdown(self, label=None, words=None) -> str:
        """The facts as a two-column table; `label(row id)` names a row (English by default)."""
        names = dict(self.ROWS)
        label = label or names.get
        return "| | |\n|---|---|\n" + "\n".join(f"| {label(k)} | {v} |" for k, v in self.rows(words))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class ReloadResult:
    info: ModelInfo
    reapplied: list[str] = field(default_factory=list)  # adapters active on the new model
    dropped: dict[str, str] = field(default_factory=dict)  # adapter -> why it could not be re-applied


@dataclass
class ChatUpdate:
    response: str | dict
    history: list
    usage: Usage | None = None
    finish_reason: str | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the new ids of this update (empty from a remote)
    new_text: bool = False  # this update added text (a stream that shows only changes can skip the rest)


Progress = Callable[[float, str], None]


@runtime_checkable
class Backend(Protocol):
    """What serves generations. Attributes that hold while a model is being reloaded: `name`, `demo`,
    `notice`, `adapters_dir`, `dtype_choice`; the others raise `ModelReloading` meanwhile."""

    name: str
    demo: bool
    notice: str
    adapters_dir: str
    dtype_choice: str
    loading: object  # a glmapp.host.LoadState while the first load runs in the background (then done), or None

    @property
    def family(self) -> str: ...
    @property
    def context_length(self) -> int: ...
    @property
    def max_input_tokens(self) -> int: ...

    def capabilities(self) -> Capabilities: ...
    def info(self) -> ModelInfo: ...
    def memory(self) -> str: ...
    def stats(self) -> dict: ...

    # adapters (names are the model ids an OpenAI server lists with `parent` = the base)
    def list_adapters(self) -> list: ...
    def loaded_adapters(self) -> list[str]: ...
    def load_adapter(self, spec: str, *, reload: bool = False, download=None): ...

    # the model's life (raise `Unavailable` where capabilities() says so)
    def quant_choices(self) -> dict[str, str | None]: ...
    def reload(self, dtype: str, progress: Progress | None = None) -> ReloadResult: ...
    def quantize(self, mode: str, progress: Progress | None = None) -> ReloadResult: ...

    # generation
    def prepare_chat(self, query: str, history, system: str | None = None, max_length: int | None = None): ...
    def chat_stream(self, query: str, history=None, system: str | None = None, *, max_length: int | None = None,
                    max_new_tokens: int | None = None, params=None, adapter: str | None = None,
                    on_handle=None) -> Iterator[ChatUpdate]: ...
    def chat_streams(self, query: str, history, columns: list[dict], *, system: str | None = None,
                     on_handle=None) -> list[Iterator[ChatUpdate]]: ...  # Compare: columns submitted together
    def submit(self, request): ...
    def cancel(self, request_id: str) -> None: ...
    def close(self) -> None: ...
