"""A local stand-in for the Hugging Face Hub (loopback only): serves folders as model repos over the
endpoints huggingface_hub's snapshot_download uses (revision info, tree listing, resolve with Range),
so `flux2 pull` is tested for real without the network. Records every request."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class HubMirror:
    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()) -> None:
        self.repos, self.gated, self.requests = repos, gated, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _handler(self):
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)) if not head else (headers or {}).get("X-Len", "0"))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                mirror.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo, kind = "/".join(parts[2:4]), parts[4]
                else:
                    repo, kind = "/".join(parts[:2]), parts[2]
                if repo not in mirror.repos:
                    return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
                if repo in mirror.gated:
                    return self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
                files = mirror._files(repo)
                if kind == "revision":
                    body = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if kind == "tree":
                    body = [
                        {"type": "file", "path": f, "size": p.stat().st_size, "oid": _oid(p)} for f, p in files.items()
                    ]
                    return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
                if kind == "resolve":
                    name = "/".join(parts[4:])
                    if name not in files:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    data = files[name].read_bytes()
                    start = 0
                    if self.headers.get("Range", "").startswith("bytes="):
                        start = int(self.headers["Range"][6:].split("-")[0])
                    headers = {"X-Repo-Commit": SHA, "ETag": f'"{_oid(files[name])}"', "Accept-Ranges": "bytes",
                               "X-Len": str(len(data))}  # fmt: skip
                    if head:
                        return self._send(200, b"", headers, head=True)
                    if start:
                        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                        return self._send(206, data[start:], headers)
                    return self._send(200, data, headers)
                return self._send(404)

            def do_GET(self) -> None:
                self._route(head=False)

            def do_HEAD(self) -> None:
                self._route(head=True)

        return Handler


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
