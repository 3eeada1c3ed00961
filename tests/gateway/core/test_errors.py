"""One exception tree: every error class of ours descends from ``MssgwError`` through a named branch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from click.testing import CliRunner

from cli.main import cli
from gateway.core.errors import (
    ConfigurationError,
    ContentError,
    CryptoError,
    DirectoryError,
    MssgwError,
    NotFoundError,
    OutageError,
    QueueError,
)

PACKAGES = ("gateway", "directory", "certs", "cli")
BRANCHES = (ConfigurationError, DirectoryError, CryptoError, ContentError, QueueError, OutageError)
#: Control flow inside a protocol engine or parser, turned into that protocol's own reply on the
#: spot, never reported as such: a line too long for the SMTP reader (500 5.5.2), a malformed DSN
#: parameter (501 5.5.4), pymap's response
#: types (SEARCH limits, an unavailable login store), an IMAP command refused while read, an HTTP
#: problem detail (RFC 9457) carrying the API's answer, the JSON reader's duplicate-member escape (a
#: 400 problem), and the whitelist parser's expat escape.
INTERNAL = {"gateway.smtp.commands.LineTooLong", "gateway.smtp.dsn.DsnSyntaxError", "gateway.imap.search.SearchLimit", "gateway.imap.server._Unavailable",
            "gateway.imap.connection._Refusal", "gateway.api.problems.Problem", "gateway.api.schemas._DuplicateKey",
            "directory.importers.whitelist._Refused", "gateway.api.transport.ClientGone"}


def _our_exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for root in PACKAGES:
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, f"{root}."):
            if ".migrations" in info.name:
                continue
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__.split(".")[0] in PACKAGES:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_is_in_the_tree() -> None:
    classes = _our_exception_classes()
    assert len(classes) > 20  # the walk really found them
    stray = sorted(name for name, cls in classes.items() if name not in INTERNAL and not issubclass(cls, MssgwError))
    assert stray == [], f"error classes outside gateway.core.errors.MssgwError: {stray}"
    loose = sorted(name for name, cls in classes.items()
                   if cls not in (MssgwError, *BRANCHES) and issubclass(cls, MssgwError)
                   and not issubclass(cls, BRANCHES) and not name.endswith(("ExpectedError", "SealError")))  # fmt: skip
    assert loose == [], f"errors directly under MssgwError, not in a branch: {loose}"


def test_value_errors_stay_value_errors() -> None:
    """Parsers' errors were ValueErrors; callers that catch ValueError still catch them."""
    from directory.identifiers import InvalidIdentifier
    from gateway.crypto._mime import MimeError
    from gateway.crypto.cms import CmsError

    for cls in (InvalidIdentifier, MimeError, CmsError):
        assert issubclass(cls, ValueError) and issubclass(cls, MssgwError)


@pytest.mark.parametrize(("args", "status"), [
    (["queue", "show", "0" * 32], 2),  # QueueError: one line, exit 2
    (["directory", "show", "nobody@a.mssante.test"], 1),  # NotFoundError: exit 1
])  # fmt: skip
def test_the_cli_answers_every_branch_in_one_line(sqlite_home, args: list[str], status: int) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli, ["--data-dir", str(sqlite_home), *args])
    assert result.exit_code == status, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert issubclass(NotFoundError, DirectoryError)
