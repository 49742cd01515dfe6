"""A minimal Hub API on 127.0.0.1 for testing uploads offline (the real Hub is unreachable here).

It implements what `huggingface_hub` needs to create repos and commit regular (non-LFS) files:
`POST /api/repos/create`, `POST /api/validate-yaml`, `POST /api/{type}s/{repo}/preupload/{rev}`,
`POST /api/{type}s/{repo}/commit/{rev}` (NDJSON, base64 contents), and to download them again:
`GET /api/{type}s/{repo}[/revision/{rev}]` (info with siblings), `GET /api/{type}s/{repo}/tree/{rev}`,
`HEAD`/`GET /[{type}s/]{repo}/resolve/{rev}/{path}`. Committed files land in
`root/{type}s/{namespace}/{name}/`. It does not cover LFS/Xet transfers, authentication or the
Hub's card validation. Tests point `HF_ENDPOINT` at `server.url` in the process that talks to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackHub:
    """Context manager running the server in a thread; `requests` records `(method, path)`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []  # the body of every repo-creation request
        self.head_sha = "0" * 40
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, payload: dict, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_HEAD(self) -> None:
                self._serve_file(head=True)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if (
                    parts[0] == "api"
                    and len(parts) >= 4
                    and parts[1] in ("models", "datasets", "spaces")
                ):
                    repo_type, repo_id = parts[1][:-1], f"{parts[2]}/{parts[3]}"
                    if len(parts) >= 5 and parts[4] == "tree":
                        return self._reply_list(self._tree(repo_type, repo_id))
                    return self._info(repo_type, repo_id)
                return self._serve_file(head=False)

            def _files(self, repo_type: str, repo_id: str) -> list[Path]:
                root = hub.repo_dir(repo_id, repo_type)
                return (
                    sorted(path for path in root.rglob("*") if path.is_file())
                    if root.is_dir()
                    else []
                )

            def _info(self, repo_type: str, repo_id: str) -> None:
                root = hub.repo_dir(repo_id, repo_type)
                if not root.is_dir():
                    return self._reply({"error": "Repository not found"}, status=404)
                siblings = [
                    {"rfilename": str(p.relative_to(root))} for p in self._files(repo_type, repo_id)
                ]
                return self._reply(
                    {"id": repo_id, "sha": hub.head_sha, "siblings": siblings, "private": False}
                )

            def _tree(self, repo_type: str, repo_id: str) -> list[dict]:
                root = hub.repo_dir(repo_id, repo_type)
                return [
                    {
                        "type": "file",
                        "path": str(p.relative_to(root)),
                        "size": p.stat().st_size,
                        "oid": hub.head_sha,
                    }
                    for p in self._files(repo_type, repo_id)
                ]

            def _reply_list(self, payload: list) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve_file(self, head: bool) -> None:
                if head:
                    hub.requests.append(("HEAD", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                repo_type = "model"
                if parts and parts[0] in ("datasets", "spaces"):
                    repo_type, parts = parts[0][:-1], parts[1:]
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._reply({"error": f"not implemented: {self.path}"}, status=404)
                path = hub.repo_dir(f"{parts[0]}/{parts[1]}", repo_type) / "/".join(parts[4:])
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.head_sha)
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return None

            def do_POST(self) -> None:
                hub.requests.append(("POST", self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                body = self._body()
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body or b"{}")
                    hub.created.append(request)
                    name = request.get("name")
                    repo_id = (
                        f"{request['organization']}/{name}" if request.get("organization") else name
                    )
                    repo_type = request.get("type") or "model"
                    hub.repo_dir(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
                    prefix = "" if repo_type == "model" else f"{repo_type}s/"
                    return self._reply({"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id})
                if parts[:2] == ["api", "validate-yaml"]:
                    return self._reply({"errors": [], "warnings": []})
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
                    files = json.loads(body or b"{}").get("files", [])
                    return self._reply(
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        }
                    )
                if len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
                    return self._commit(parts[1][:-1], f"{parts[2]}/{parts[3]}", body)
                return self._reply({"error": f"not implemented: {self.path}"}, status=404)

            def _commit(self, repo_type: str, repo_id: str, body: bytes) -> None:
                target = hub.repo_dir(repo_id, repo_type)
                written = []
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "file":
                        path = target / item["value"]["path"]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(base64.b64decode(item["value"]["content"]))
                        written.append(item["value"]["path"])
                    elif item["key"] in ("deletedFile", "deletedFolder"):
                        (target / item["value"]["path"]).unlink(missing_ok=True)
                hub.commits.append({"repo_id": repo_id, "repo_type": repo_type, "files": written})
                oid = f"{len(hub.commits):040x}"
                hub.head_sha = oid
                return self._reply(
                    {
                        "success": True,
                        "commitOid": oid,
                        "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                    }
                )

        return Handler
