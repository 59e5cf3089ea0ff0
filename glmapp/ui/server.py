"""How the web app is served: what visitors can make the server keep, and the login on every route.

Notable choices:
- Gradio's defaults keep the state of 10,000 browser tabs, accept uploads of any size and keep them
  for good. `ServerLimits` bounds each (the app has no upload widget: the route stays open in Gradio,
  so uploads are small and swept).
- Gradio checks the login on most routes but not all (`/gradio_api/heartbeat/{session}`,
  `/gradio_api/cancel`, `/gradio_api/reset`, ... answer anonymous callers). `LoginRequired` is an ASGI
  middleware in front of every route: with a login configured, only the login page and what it loads
  are served without one (and the API's routes, which check their own keys). It asks Gradio's own `/gradio_api/user` endpoint function who is logged in,
  so the cookie and token rules stay Gradio's.
- Every answer carries a Content-Security-Policy that lets the page load images only from this server
  (and data:/blob: URLs). Chat text is rendered so that it never makes an image (render.py); this is
  the second layer, for whatever a renderer might still turn into one: a reply cannot make the
  visitor's browser call another host and leak the conversation in the URL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    # Browser tabs whose state (chat history, adapter choice, component values: ~0.2 MB each) is kept;
    # beyond it the least recently used tab's state is dropped (Gradio's `state_session_capacity`).
    max_sessions: int = 1000
    # Gradio's `max_file_size`: larger uploads are refused with 413. Training data and an "Export all" of
    # conversations are the largest uploads users make; 50 MB holds tens of thousands of examples.
    max_upload: str = "50mb"
    # Gradio's `delete_cache` (every, older than) in seconds: uploads and exported files are deleted after
    # an hour (and all of them when the app stops).
    cache_sweep: tuple[int, int] = (3600, 3600)


# What the login page itself loads (seen in a browser): the page, its scripts, styles and fonts, the form;
# and startup-events, which Gradio's launch calls on itself without a login (it runs once, then is a no-op).
PUBLIC_PATHS = {("GET", "/"), ("HEAD", "/"), ("POST", "/login"), ("POST", "/login/"), ("GET", "/theme.css"),
                ("GET", "/favicon.ico"), ("GET", "/gradio_api/startup-events")}
PUBLIC_PREFIXES = ("/assets/", "/static/")
USER_ROUTE = "/gradio_api/user"


def is_public(method: str, path: str) -> bool:
    return (method, path) in PUBLIC_PATHS or (method in ("GET", "HEAD") and path.startswith(PUBLIC_PREFIXES))


# The OpenAI-compatible API (glmapp.api) checks its own bearer keys: an API client cannot log in to the page.
# Only its routes live under these paths (Starlette matches paths literally, so "/v1/../x" is no Gradio route).
API_PREFIX, API_PATHS = "/v1/", {"/health", "/metrics"}


def is_api(path: str) -> bool:
    return path.startswith(API_PREFIX) or path in API_PATHS


class LoginRequired:
    """ASGI middleware: with a login configured, a request without one gets Gradio's own 401 answer."""

    def __init__(self, app):
        self.app = app
        self._current_user = None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        gradio_app = scope["app"]  # Starlette puts the application (Gradio's App) in every scope
        if gradio_app.auth is None and gradio_app.auth_dependency is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and (is_public(scope["method"], scope["path"]) or is_api(scope["path"])):
            return await self.app(scope, receive, send)
        from starlette.requests import HTTPConnection, Request
        from starlette.responses import JSONResponse

        connection = Request(scope) if scope["type"] == "http" else HTTPConnection(scope)
        if await self._user(gradio_app, connection) is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        blocks = gradio_app.get_blocks()
        response = JSONResponse({"detail": {"error": "Not authenticated", "auth_message": blocks.auth_message}},
                                status_code=401)
        await response(scope, receive, send)

    async def _user(self, gradio_app, request):
        if self._current_user is None:
            self._current_user = next(r.endpoint for r in routes(gradio_app) if r.path == USER_ROUTE)
        return await self._current_user(request)


def routes(app):
    """Every route of a FastAPI app with its full path, methods and endpoint (included routers flattened)."""
    from fastapi.routing import iter_route_contexts

    return list(iter_route_contexts(app.routes))


IMAGE_POLICY = "img-src 'self' data: blob:"


class ImagePolicy:
    """ASGI middleware: adds the Content-Security-Policy `IMAGE_POLICY` to every HTTP answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                # Added beside any policy Gradio set (a browser enforces each one), never replacing it.
                headers = [*message.get("headers", []), (b"content-security-policy", IMAGE_POLICY.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_policy)
