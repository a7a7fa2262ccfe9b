"""`fmn serve`: the web page on 127.0.0.1 (forget, watch, see the grid, download the patch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from forget_me_not.cli import options as opt
from forget_me_not.errors import FmnError


def serve(
    model: opt.Model = "embedded",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine "
                                           "only).")] = "127.0.0.1",
    reports: Annotated[Path | None, typer.Option(help="Folder of earlier `fmn bench` reports "
                                                      "and leaderboards to offer.")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per concept in the grid.")] = 4,
    device: opt.Device = None,
) -> None:
    """Serve the web page until Ctrl-C."""
    from forget_me_not.serve.app import make_server

    if not 0 < port < 65536:
        raise FmnError(f"--port must be 1..65535, got {port}")
    opt.require_positive("--n", n)
    if reports is not None and not reports.is_dir():
        raise FmnError(f"--reports {reports} is not a folder: pass the folder `fmn bench` wrote")
    server = make_server(model, host, port, reports=reports, device=device, n=n)
    typer.echo(f"serving {model} on http://{host}:{port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
