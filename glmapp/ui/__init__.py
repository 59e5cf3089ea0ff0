"""glmapp web app: `build_ui(backend)` makes the Gradio Blocks, `launch(config)` serves them."""

from __future__ import annotations

import sys

from glmapp import commands
from glmapp.ui.config import AppConfig, ConfigError, load_config
from glmapp.ui.server import ImagePolicy, LoginRequired, ServerLimits

__all__ = ["AppConfig", "ConfigError", "ServerLimits", "build_ui", "launch", "load_config"]


def __getattr__(name: str):
    if name == "build_ui":  # imports gradio: only when asked, so `python app.py --help` answers at once
        from glmapp.ui.layout import build_ui

        return build_ui
    raise AttributeError(f"module 'glmapp.ui' has no attribute {name!r}")


def launch(config: AppConfig, *, block: bool = True, limits: ServerLimits | None = None,
           wait_for_model: bool = False):
    """Start loading the model, build the UI and serve it at once (the page shows the load's progress);
    returns the Blocks (already running when block=False; with `wait_for_model`, once the model is served, or
    raising its load error)."""
    from glmapp.ui.layout import build_ui

    from glmapp.api import KeyCheck, RateLimiter, build_router, response_cache

    credentials = config.credentials()  # a bad --auth-file (or --api-keys-file) fails before the model is loaded
    api_keys = KeyCheck.of(config)
    store = config.open_store()  # a bad --db or --data-dir fails before the model is loaded
    backend = make_backend(config)
    if wait_for_model:
        wait_until_loaded(backend)
    if backend.demo:
        print(f"[demo] Serving the demo checkpoint ({backend.name}): random weights, replies are gibberish. "
              f"For real weights: {commands.download()}, or {commands.RUN_APP_WITH_MODEL}.",
              file=sys.stderr)
    limits = limits or ServerLimits()
    demo = build_ui(backend, config, limits, store)
    routes = []
    if getattr(backend, "gpu_calls", False):  # ZeroGPU: the API's engine requests would run outside GPU calls
        print("The OpenAI-compatible API is not served on ZeroGPU (CUDA exists only inside GPU calls); use the "
              "page or its /gradio_api/call/chat endpoint.", file=sys.stderr)
    elif backend.capabilities().tokenization is None:
        routes = build_router(backend, api_keys, RateLimiter.of(config), response_cache(config)).routes
    else:  # the API needs the tokenizer: clients call the model server's own OpenAI API instead
        print("The OpenAI-compatible API is not served by a --backend-url front end: call the model server's "
              "own /v1 API.", file=sys.stderr)
    local_url, share_url = serve(demo, config, credentials, limits, routes)
    print(f"glmapp is running at {local_url}" + (" (login required)" if credentials else ""), flush=True)
    if config.share:
        if share_url:
            print(f"Public link: {share_url}" + ("" if credentials else
                  "  (anyone with the link can chat: consider --auth USER:PASS)"), flush=True)
        else:
            print("Could not create a public link (it needs network access to Gradio's share servers; see the "
                  "message above). The app keeps running locally at " + local_url, flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            backend.close()
            store.close()
    return demo


def make_backend(config: AppConfig):
    """The Backend the app serves: a RemoteBackend with --backend-url, else a local model (ModelHost)."""
    if config.backend_url:
        from glmapp.backends.remote import RemoteBackend

        return RemoteBackend(config.backend_url, config.backend_key, family=config.backend_family)
    from glmapp.backends import LocalBackend
    from glmapp.ui.zero_gpu import zero_gpu_backend

    return zero_gpu_backend(LocalBackend.start(
        config.model, demo=config.demo, dtype=config.dtype, device=config.device,
        max_input_tokens=config.max_input_tokens, adapters_dir=config.adapters_dir, quant=config.quant,
        engine_config=config.engine_config()))


def wait_until_loaded(backend, timeout: float = 3600.0) -> None:
    """Block until a background load has finished; its failure is raised (ModelLoadFailed)."""
    import time

    from glmapp.errors import ModelLoadFailed

    deadline = time.monotonic() + timeout
    while (state := backend.loading) is not None and not state.done:
        if state.error:
            raise ModelLoadFailed(state.error)
        if time.monotonic() > deadline:
            raise TimeoutError(f"The model did not load within {timeout:.0f} s ({state.describe()})")
        time.sleep(0.05)  # polling a background thread's progress, bounded by the deadline


def serve(demo, config: AppConfig, credentials: list[tuple[str, str]], limits: ServerLimits,
          api_routes=()) -> tuple[str, str | None]:
    """Start the Gradio server for `demo` (without blocking) -> (local URL, public link or None).

    `api_routes` (the OpenAI-compatible API's) are given to the FastAPI app when Gradio creates it, so they
    are there before the server answers and are matched before Gradio's own routes."""
    import gradio as gr
    from starlette.middleware import Middleware

    from glmapp.ui.layout import CSS

    demo.queue(default_concurrency_limit=config.max_concurrency)
    _app, local_url, share_url = demo.launch(
        server_name=config.host, server_port=config.port, share=config.share, auth=credentials or None,
        auth_message="glmapp: log in with the user name and password you were given." if credentials else None,
        prevent_thread_lock=True, ssr_mode=False, quiet=True, css=CSS, theme=gr.themes.Soft(),
        footer_links=["api", "settings"], state_session_capacity=limits.max_sessions,
        max_file_size=limits.max_upload,
        app_kwargs={"middleware": [Middleware(ImagePolicy), Middleware(LoginRequired)], "routes": list(api_routes)},
    )
    return local_url, share_url
