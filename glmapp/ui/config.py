"""AppConfig: every setting of the web app, defined once. CLI flags and environment variables map onto it.

Precedence: command-line flag > environment variable (for Hugging Face Spaces) > default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from glmapp.choices import DEFAULT_MODEL, DEMO_DEFAULTS, DTYPES, QUANT_MODES
from glmapp.errors import GlmappError


class ConfigError(GlmappError):
    """A flag or environment variable of the app has a value that cannot be used."""


def _opt(default, help: str, env: str, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, env=env, **argparse_kwargs))


@dataclass
class AppConfig:
    model: str | None = _opt(None, f"model folder or hub id (default: {DEFAULT_MODEL} from the Hugging Face "
                                   "cache, else the demo checkpoint with a banner)", "GLMAPP_MODEL")
    demo: bool = _opt(False, "use the bundled demo checkpoint (tiny, random weights: replies are gibberish)",
                      "GLMAPP_DEMO")
    dtype: str = _opt("auto", "auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16", "GLMAPP_DTYPE")
    quant: str | None = _opt(None, "quantization: none, int8, int4 (ChatGLM's own), bnb-int8, bnb-nf4 "
                                   "(bitsandbytes); default: as the checkpoint is stored", "GLMAPP_QUANT")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N", "GLMAPP_DEVICE")
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 to reach it from other machines)", "GLMAPP_HOST")
    port: int = _opt(7860, "port to listen on", "GLMAPP_PORT")
    share: bool = _opt(False, "create a temporary public gradio.live link (combine with --auth)", "GLMAPP_SHARE")
    auth: list[str] = _opt(None, "USER:PASS allowed to log in; repeat for more users "
                                 "(env: comma-separated list)", "GLMAPP_AUTH", action="append")
    auth_file: str | None = _opt(None, "file with one USER:PASS per line (# comments allowed)", "GLMAPP_AUTH_FILE")
    max_concurrency: int = _opt(4, "generations running at the same time (more users wait in the queue)",
                                "GLMAPP_MAX_CONCURRENCY")
    max_input_tokens: int | None = _opt(None, "longest prompt accepted, in tokens (default: the model's context)",
                                        "GLMAPP_MAX_INPUT_TOKENS")
    max_new_tokens: int = _opt(2048, "upper limit of the max-new-tokens slider", "GLMAPP_MAX_NEW_TOKENS")
    kv_cache_mb: int | None = _opt(None, "KV cache budget in MB (default: 90%% of free GPU memory, 512 MB on CPU)",
                                   "GLMAPP_KV_CACHE_MB")
    compile: bool = _opt(False, "torch.compile the decode step (CUDA: minutes of warm-up for faster decoding)",
                         "GLMAPP_COMPILE")
    output_quant: str = _opt("none", "CPU decoding reads an int8 or int4 copy of the output layer (none, int8, int4): "
                                     "faster with a large vocabulary, at some loss of logit precision",
                             "GLMAPP_OUTPUT_QUANT")
    engine: str = _opt("auto", "threaded (one engine thread batches all users), inline (each handler runs the steps "
                               "of its own requests: ZeroGPU, where CUDA exists only inside a decorated call) or auto "
                               "(inline when the spaces package is importable and SPACES_ZERO_GPU is set)",
                       "GLMAPP_ENGINE")
    adapters_dir: str = _opt("adapters", "folder of PEFT LoRA adapters (one sub-folder each) listed by the adapter "
                                         "picker", "GLMAPP_ADAPTERS_DIR")
    api_key: list[str] = _opt(None, "bearer key accepted by the OpenAI-compatible API under /v1; repeat for more "
                                    "keys (env: comma-separated list). No key: the API is open, unless --auth is set",
                              "GLMAPP_API_KEY", action="append", metavar="KEY")
    api_keys_file: str | None = _opt(None, "file with one API key per line (# comments allowed)",
                                     "GLMAPP_API_KEYS_FILE")
    rate_limit_rpm: int | None = _opt(None, "API requests per minute allowed to each API key (or client address "
                                            "when the API is open); default: no limit", "GLMAPP_RATE_LIMIT_RPM")
    rate_limit_tpm: int | None = _opt(None, "API tokens per minute allowed to each API key (or client address): "
                                            "prompt + max_tokens counted at admission, the unused part given back "
                                            "at the end; default: no limit", "GLMAPP_RATE_LIMIT_TPM")
    redis_url: str | None = _opt(None, "Redis shared by several front-end processes for the API's rate limits and "
                                       "response cache, e.g. redis://HOST:6379/0 (default: both in this process)",
                                 "GLMAPP_REDIS_URL")
    response_cache_size: int = _opt(1024, "API answers to repeated deterministic requests (greedy or seeded) kept "
                                          "in the response cache; 0 turns it off", "GLMAPP_RESPONSE_CACHE_SIZE")
    backend_url: list[str] = _opt(None, "serve the app from an OpenAI-compatible model server instead of a local "
                                        "model (vLLM, another glmapp): its base URL, e.g. http://HOST:8000/v1; "
                                        "repeat for replicas of the same model (env: comma-separated list)",
                                  "GLMAPP_BACKEND_URL", action="append", metavar="URL")
    backend_key: str | None = _opt(None, "bearer key for --backend-url (env preferred: it stays out of the process "
                                         "list)", "GLMAPP_BACKEND_KEY")
    backend_family: str | None = _opt(None, "chatglm2 or chatglm3: the family behind --backend-url (default: from "
                                            "the model's name)", "GLMAPP_BACKEND_FAMILY")
    allow_train: bool = _opt(False, "keep the Train tab on with --share and no --auth (anyone holding the link "
                                    "could then run training on this machine)", "GLMAPP_ALLOW_TRAIN")
    comparisons_file: str = _opt("comparisons.jsonl", "JSONL file the Compare tab appends votes to",
                                 "GLMAPP_COMPARISONS_FILE")
    data_dir: str = _opt("data", "folder of the app's data: the conversations and votes database (SQLite) "
                                 "unless --db is set", "GLMAPP_DATA_DIR")
    db: str | None = _opt(None, "SQLAlchemy URL of the conversations and votes database, e.g. "
                                "postgresql+psycopg://USER@HOST/glmapp for several front ends (default: one SQLite "
                                "file under --data-dir)", "GLMAPP_DB")

    def __post_init__(self):
        if self.auth is None:
            self.auth = []
        if self.api_key is None:
            self.api_key = []
        if self.backend_url is None:
            self.backend_url = []
        for url in self.backend_url:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--backend-url must start with http:// or https:// (got {url!r}).")
        if self.backend_family is not None and self.backend_family not in ("chatglm2", "chatglm3"):
            raise ConfigError(f"--backend-family must be chatglm2 or chatglm3 (got {self.backend_family!r}).")
        if self.quant is not None and self.quant not in QUANT_MODES:
            raise ConfigError(f"--quant must be one of {', '.join(QUANT_MODES)} (got {self.quant!r}).")
        if self.engine not in ENGINE_MODES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINE_MODES)} (got {self.engine!r}).")
        if self.output_quant not in ("none", "int8", "int4"):
            raise ConfigError(f"--output-quant must be one of none, int8, int4 (got {self.output_quant!r}).")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r}).")
        for name in ("max_concurrency", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.kv_cache_mb is not None and self.kv_cache_mb < 1:
            raise ConfigError(f"--kv-cache-mb must be at least 1 (got {self.kv_cache_mb}).")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ConfigError(f"--max-input-tokens must be at least 1 (got {self.max_input_tokens}).")
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)}).")
        if self.response_cache_size < 0:
            raise ConfigError(f"--response-cache-size must be 0 (off) or more (got {self.response_cache_size}).")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("--redis-url must start with redis://, rediss:// or unix:// (e.g. redis://HOST:6379/0).")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 1 and 65535 (got {self.port}).")

    def engine_config(self):
        from glmapp.engine.engine import EngineConfig

        return EngineConfig(kv_cache_mb=self.kv_cache_mb, compile=self.compile, output_quant=self.output_quant,
                            inline=engine_mode(self.engine) == "inline")

    def open_store(self):
        """The conversations and votes database named by --db (else SQLite under --data-dir), migrated."""
        from glmapp.store import StoreError, open_store, sqlite_url

        try:
            return open_store(self.db or sqlite_url(self.data_dir))
        except OSError as e:
            raise ConfigError(f"Cannot use --data-dir {self.data_dir!r}: {e.strerror}.") from None
        except StoreError as e:
            raise ConfigError(f"--db / --data-dir: {e}") from None

    def credentials(self) -> list[tuple[str, str]]:
        """(user, password) pairs from --auth and --auth-file; empty means no login."""
        entries = list(self.auth)
        if self.auth_file:
            path = Path(self.auth_file).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ConfigError(f"Cannot read --auth-file {str(path)!r}: {e.strerror}.") from None
            entries += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        pairs = []
        for entry in entries:
            user, sep, password = entry.partition(":")
            if not sep or not user or not password:
                raise ConfigError(f"Login {entry.split(':')[0]!r}...: expected USER:PASS with both parts non-empty.")
            pairs.append((user, password))
        return pairs


ENGINE_MODES = ("auto", "threaded", "inline")


def engine_mode(choice: str, environ: dict[str, str] | None = None) -> str:
    """threaded or inline: `auto` is inline on ZeroGPU (the `spaces` package importable, SPACES_ZERO_GPU set)."""
    import importlib.util

    if choice != "auto":
        return choice
    environ = os.environ if environ is None else environ
    zero_gpu = environ.get("SPACES_ZERO_GPU", "") != "" and importlib.util.find_spec("spaces") is not None
    return "inline" if zero_gpu else "threaded"


def _base_type(f) -> type:
    text = str(f.type)
    return int if text.startswith("int") else bool if text == "bool" else str


def _from_env(f, raw: str):
    kind = _base_type(f)
    if f.metadata.get("action") == "append":
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{f.metadata['env']} must be an integer (got {raw!r}).") from None
    return raw


_GRADIO_ENV = {"host": "GRADIO_SERVER_NAME", "port": "GRADIO_SERVER_PORT"}


def _sliders_note() -> str:
    parts = [f"{family}: temperature {d['temperature']}, top_p {d['top_p']}, max length {d['max_length']}"
             for family, d in DEMO_DEFAULTS.items()]
    return "The Chat tab's sliders start at the official demos' values (" + "; ".join(parts) + ")."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="glmapp web app: chat with and compare ChatGLM2/ChatGLM3 models in the browser. "
                    "Every flag can also be set by the environment variable shown (for Hugging Face Spaces). "
                    + _sliders_note(),
    )
    for f in fields(AppConfig):
        flag = "--" + f.name.replace("_", "-")
        # The parser's own default stays None (a flag given beats the environment), so the dataclass's is shown.
        shown_default = f" (default: {f.default})" if f.default not in (None, False) else ""
        help_text = f"{f.metadata['help']}{shown_default} [env {f.metadata['env']}]"
        kind = _base_type(f)
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.metadata.get("action") == "append":
            parser.add_argument(flag, action="append", default=None, metavar=f.metadata.get("metavar", "USER:PASS"),
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> AppConfig:
    """Flags > environment > defaults, validated by AppConfig."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values = {}
    for f in fields(AppConfig):
        if args.get(f.name) is not None:
            values[f.name] = args[f.name]
        elif environ.get(f.metadata["env"], "") != "":
            values[f.name] = _from_env(f, environ[f.metadata["env"]])
        elif f.name in ("host", "port") and environ.get(_GRADIO_ENV[f.name], "") != "":
            # Hugging Face Spaces tell Gradio where to listen (0.0.0.0:7860) through these variables.
            values[f.name] = _from_env(f, environ[_GRADIO_ENV[f.name]])
        elif f.default is not MISSING:
            values[f.name] = f.default
    return AppConfig(**values)
