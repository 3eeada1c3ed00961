"""The ``mssgw`` command: one group, one sub-group per area, errors as one line.

Each command is a thin shell over a service function (``directory.admin``,
``gateway.*``) that tests call too. Any failure prints one clear line on stderr
and exits non-zero; a traceback is never shown to the admin.

Exit status, the same for every command: 0 done; 1 refused or not found (an error whose
class sets ``exit_code = 1``, e.g. ``directory.admin.NotFoundError``, or a decision such
as ``domains check`` refusing); 2 usage or configuration error (click's own usage errors
too). A database that cannot be reached exits 2 as well.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any

import click

from cli.context import AppContext
from gateway.core.errors import MssgwError

#: Modules that each define ``commands``: a click command or group added to ``mssgw``.
COMMAND_MODULES = (
    "cli.init",
    "cli.directory",
    "cli.domains",
    "cli.certs",
    "cli.message",
    "cli.queue",
    "cli.audit",
    "cli.serve",
    "cli.clients",
    "cli.peers",
)

#: Exit status of usage and configuration errors; "refused / not found" errors carry ``exit_code = 1``.
EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


class ExpectedError(MssgwError):
    """Base of errors a command reports as one line (subclasses live with their services)."""


def hoist_data_dir(args: list[str]) -> list[str]:
    """Move ``--data-dir`` (or ``--data-dir=...``) to the front so every command takes it."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg == "--data-dir" and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 2
            continue
        if arg.startswith("--data-dir="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


class SafeGroup(click.Group):
    """A group that turns every error into one line on stderr and a non-zero exit."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # ``--data-dir DIR`` is accepted anywhere on the line (``mssgw directory list --data-dir X``).
        return super().parse_args(ctx, hoist_data_dir(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # the reader went away (``mssgw queue list | head``): quietly, as Unix tools do
            with contextlib.suppress(OSError):  # nothing more reaches it, the final flush included
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except MssgwError as exc:  # the one tree of errors we explain (gateway.core.errors)
            click.echo(f"error: {exc}", err=True)
            ctx.exit(int(getattr(exc, "exit_code", EXIT_ERROR)))
        except Exception as exc:  # last resort: one line, never a traceback
            from sqlalchemy.exc import OperationalError, SQLAlchemyError

            if isinstance(exc, OperationalError):
                click.echo("error: the database cannot be reached or is locked; try again", err=True)
            elif isinstance(exc, SQLAlchemyError):
                click.echo(f"error: database error ({type(exc).__name__}); nothing was changed", err=True)
            else:
                click.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=SafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    envvar="MSSGW_HOME",
    help="The operator's home folder (default: $MSSGW_HOME, else ./mssgw-data).",
)
@click.version_option(package_name="mssgw")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None) -> None:
    """mssgw: a secure health-messaging gateway (MSSanté / Direct Project operator)."""
    app = AppContext(data_dir)
    ctx.obj = app
    ctx.call_on_close(app.close)


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # an area not built yet
            raise
        commands = module.commands
        for command in commands if isinstance(commands, list | tuple) else [commands]:
            cli.add_command(command)


_register()


def main() -> None:
    try:
        cli.main(prog_name="mssgw")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
