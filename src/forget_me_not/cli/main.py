"""`fmn`: wires the command groups together and turns user errors into one-line messages."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings

import click
import typer
from typer.core import TyperGroup

from forget_me_not import __version__
from forget_me_not.errors import FmnError

# Each module exposes register(app). A group not present in this install is skipped, so a new
# command is added by creating its module and naming it here.
COMMAND_MODULES = ("generate", "forget", "invert", "evaluate", "attack", "bench", "patch",
                   "world", "correct", "recipes", "serve")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class FmnGroup(TyperGroup):
    """Runs every subcommand under one handler: FmnError -> `error: <msg>` on stderr, exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FmnError as err:
            if os.environ.get("FMN_DEBUG") == "1":
                traceback.print_exc()  # the traceback on request; the exit code stays 2
            message = " ".join(str(err).split())  # always one line
            click.echo(f"error: {message}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            click.echo("error: interrupted: nothing was written; run the command again",
                       err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=FmnGroup,
    name="fmn",
    help="Forget-Me-Not: make text-to-image models forget concepts, and measure it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fmn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Forget-Me-Not: make text-to-image models forget concepts, and measure it."""
    _quiet_libraries()
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    # What a user should know, as `warning: ...`, without the source line it came from.
    return f"warning: {' '.join(str(message).split())}\n"


def _quiet_libraries() -> None:
    # Loading bars and library chatter would bury our own progress bar and one-line errors.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _register_all() -> None:
    for name in COMMAND_MODULES:
        full = f"forget_me_not.cli.{name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as err:
            if err.name == full:
                continue  # that command group is not part of this install yet
            raise
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: usage errors (a bad option value) are one `error:` line
    too, not the framework's boxed message."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="fmn", standalone_mode=False)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        click.echo("error: interrupted: nothing was written; run the command again", err=True)
        code = EXIT_INTERRUPTED
    except (click.ClickException, typer.exceptions.TyperException) as err:
        if not hasattr(err, "format_message"):
            raise
        ctx = getattr(err, "ctx", None)
        name = getattr(ctx, "command_path", "fmn") if ctx is not None else "fmn"
        message = " ".join(err.format_message().split())
        if message:  # empty: the help was printed (a command called with no arguments)
            click.echo(f"error: {message} (see `{name} --help`)", err=True)
        code = getattr(err, "exit_code", EXIT_USER_ERROR)
    code = code if isinstance(code, int) else 0
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
