"""The web page's server: Python's own threading HTTP server and a page of plain HTML + JS.

Why not Gradio or FastAPI: neither is needed for four JSON routes and a few files, the page must
work offline with nothing more installed, and the work itself runs on one job thread anyway.
Routes: `/` (the page), `/api/info`, `POST /api/forget`, `/api/jobs/ID`, `/jobs/ID/FILE`,
`/reports/PATH` (files of earlier `fmn bench` reports and leaderboards, read-only).
"""

from __future__ import annotations

import errno
import json
import mimetypes
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from forget_me_not.errors import FmnError
from forget_me_not.serve.jobs import Jobs

MAX_BODY = 10_000  # a forget request is a few words


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, jobs: Jobs, model: str, reports: Path | None) -> None:
        super().__init__(address, Handler)
        self.jobs, self.model, self.reports = jobs, model, reports


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise
        return

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?")[0]
        if path == "/":
            page = resources.files("forget_me_not.serve").joinpath("page.html").read_bytes()
            return self._send(200, page, "text/html; charset=utf-8")
        if path == "/api/info":
            return self._json(200, self._info())
        if path.startswith("/api/jobs/"):
            job = self.server.jobs.get(path.rsplit("/", 1)[-1])
            return self._json(200, job.public()) if job else self._json(404, {
                "error": "no such job: start a forget from the page"})
        if path.startswith("/jobs/"):
            parts = path.split("/")
            job = self.server.jobs.get(parts[2]) if len(parts) == 4 else None
            if job and job.folder and parts[3] in ("grid.png", "patch.safetensors"):
                return self._file(job.folder / parts[3])
        if path.startswith("/reports/") and self.server.reports is not None:
            root = self.server.reports.resolve()
            target = (root / path.removeprefix("/reports/")).resolve()
            if target.is_relative_to(root) and target.is_file():
                return self._file(target)
        self._json(404, {"error": f"nothing at {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/api/forget":
            return self._json(404, {"error": f"nothing at {self.path}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise FmnError("the request is empty or too large: send concept, method, recipe")
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise FmnError("the request must be a JSON object")
            job = self.server.jobs.submit(str(body.get("client") or self.client_address[0]),
                                          str(body.get("concept") or ""),
                                          body.get("method") or None, body.get("recipe") or None)
        except FmnError as err:
            return self._json(400, {"error": " ".join(str(err).split())})
        except (ValueError, UnicodeDecodeError):
            return self._json(400, {"error": "the request is not JSON: send concept, method, "
                                             "recipe"})
        self._json(200, job.public())

    def _info(self) -> dict[str, Any]:
        from forget_me_not import methods, recipes

        jobs = self.server.jobs
        concepts: list[str] = []
        if jobs.family == "embedded":
            from forget_me_not.world.concepts import all_concepts

            concepts = [c.name for c in all_concepts()]
        loaded = {r: recipes.load(r) for r in recipes.names()}
        fitting = [r for r, recipe in loaded.items() if not recipe.families
                   or jobs.family in recipe.families]
        reports = []
        if self.server.reports is not None and self.server.reports.is_dir():
            root = self.server.reports
            reports = sorted(str(p.relative_to(root)) for p in root.rglob("*.html"))
        return {"model": self.server.model, "family": jobs.family, "concepts": concepts,
                "methods": methods.names("forget"),
                "recipes": [r for r in fitting if methods.get(
                    loaded[r].parts[0].method).task == "forget"],
                "reports": reports}

    def _json(self, code: int, data: dict[str, Any]) -> None:
        self._send(code, json.dumps(data).encode(), "application/json")

    def _file(self, path: Path) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, path.read_bytes(), kind)

    def _send(self, code: int, data: bytes, kind: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away; the job goes on and finishes cleanly


def make_server(model: str = "embedded", host: str = "127.0.0.1", port: int = 7860, *,
                reports: Path | None = None, device: str | None = None, n: int = 4,
                workdir: Path | None = None) -> Server:
    """Load the model, start the job thread and bind the port (checked before the load)."""
    from forget_me_not.models import detect_family, load_pipeline

    probe = _bind_check(host, port)
    probe.close()
    pipe = load_pipeline(model, device, None)
    root = Path(workdir or tempfile.mkdtemp(prefix="fmn_serve_"))
    jobs = Jobs(pipe, detect_family(pipe), root, n=n)
    try:
        return Server((host, port), jobs, model, reports)
    except OSError as err:
        raise _port_error(port, err) from None


def _bind_check(host: str, port: int):
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise _port_error(port, err) from None
    return sock


def _port_error(port: int, err: OSError) -> FmnError:
    if err.errno == errno.EADDRINUSE:
        return FmnError(f"port {port} is in use: pass another, e.g. --port {port + 1}")
    return FmnError(f"cannot listen on port {port} ({err.strerror}): pass another --port")
