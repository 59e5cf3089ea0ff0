"""A Hugging Face hub on 127.0.0.1 for download tests: huggingface_hub's real client (HF_ENDPOINT pointed here)
fetches a local checkpoint folder through the hub's HTTP protocol (repo info, file tree, HEAD/GET with Range).

The real hub is not reachable from the tests; this speaks the part of its protocol `snapshot_download` uses, so
what is tested is our code plus huggingface_hub's own download, resume and caching. `hold` makes each weight
file (or the one named) stop after its first half until `release()`, so a test can watch a download in progress (or interrupt it).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path, hold: bool | str = False):
        self.repo_id, self.folder = repo_id, Path(folder)
        self.files = {p.relative_to(self.folder).as_posix(): p for p in sorted(self.folder.rglob("*")) if p.is_file()}
        self.gate = threading.Event()
        self.hold = hold  # True: every weight file; a name: that file only
        if not hold:
            self.gate.set()
        self.ranges: list[str] = []  # the Range headers of weight GETs (a resumed download sends one)
        self.fetched: list[str] = []  # the files GET asked for
        self.half_sent = threading.Event()  # a held file's first half went out
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()

            def do_GET(self):
                self._answer(body=True)

            def do_HEAD(self):
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                api = f"/api/models/{hub.repo_id}"
                if path.startswith(api + "/revision/"):
                    return self._json({"id": hub.repo_id, "modelId": hub.repo_id, "sha": SHA, "private": False,
                                       "siblings": [{"rfilename": f, "size": p.stat().st_size}
                                                    for f, p in hub.files.items()]})
                if path.startswith(api + "/tree/"):
                    return self._json([{"type": "file", "path": f, "size": p.stat().st_size, "oid": _etag(p)}
                                       for f, p in hub.files.items()])
                prefix = f"/{hub.repo_id}/resolve/"
                if not path.startswith(prefix):
                    return self._missing()
                name = path[len(prefix):].split("/", 1)[1] if "/" in path[len(prefix):] else ""
                file = hub.files.get(name)
                if file is None:
                    return self._missing()
                data = file.read_bytes()
                if body:
                    hub.fetched.append(name)
                start = 0
                header = self.headers.get("Range")
                if header and body:
                    hub.ranges.append(header)
                    start = int(header.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", f'"{_etag(file)}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                rest = data[start:]
                held = name == hub.hold if isinstance(hub.hold, str) else name.endswith((".safetensors", ".bin"))
                if held and not hub.gate.is_set():
                    half = len(rest) // 2
                    self.wfile.write(rest[:half])
                    self.wfile.flush()
                    hub.half_sent.set()
                    hub.gate.wait(300)
                    rest = rest[half:]
                self.wfile.write(rest)

        return Handler


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
