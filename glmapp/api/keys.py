"""Who may call the API: bearer keys from --api-key / --api-keys-file.

No key and no --auth: the API is open, like the page. --auth without a key: the API refuses every call
(the page's login cannot be given by an API client), and says how to allow them.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from glmapp.api.generation import APIError
from glmapp.ui.config import ConfigError


def load_keys(keys: list[str], keys_file: str | None) -> list[str]:
    """The keys given on the command line plus one per line of the file (# comments and blank lines skipped)."""
    found = [k.strip() for k in keys if k.strip()]
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"Cannot read --api-keys-file {str(path)!r}: {e.strerror}.") from None
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return found


class KeyCheck:
    def __init__(self, keys: list[str], login_required: bool):
        self._keys = [k.encode() for k in keys]
        self._closed = login_required and not keys

    @classmethod
    def of(cls, config) -> KeyCheck:
        return cls(load_keys(config.api_key, config.api_keys_file), bool(config.auth or config.auth_file))

    def check(self, authorization: str | None) -> str | None:
        """Raise APIError(401) unless the `Authorization` header carries an accepted key (or none is needed).

        Returns which key it was, as "key:N" (N its place in the list: the key itself is never kept for rate
        limits or shown), or None when the API is open."""
        if self._closed:
            raise APIError(401, "This server requires a login (--auth) and has no API key: restart it with "
                                "--api-key KEY (or --api-keys-file FILE) and send 'Authorization: Bearer KEY'.",
                           code="api_key_required")
        if not self._keys:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="missing_api_key")
        given = key.strip().encode()
        matches = [hmac.compare_digest(given, k) for k in self._keys]  # all compared: the time tells nothing
        if not any(matches):
            raise APIError(401, "Incorrect API key.", code="invalid_api_key")
        return f"key:{matches.index(True)}"
