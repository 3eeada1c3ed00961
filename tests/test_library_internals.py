"""The aiosmtpd, pymap and aiohttp internals our subclasses rely on are still there, with the same shape.

``gateway/smtp`` subclasses aiosmtpd's ``SMTP`` (its own command loop, STARTTLS, DATA reader,
AUTH) and ``gateway/imap`` subclasses pymap's connection, state, session and Maildir classes
(bounded parsing, SEARCH/FETCH turns, Maildir layout); ``gateway/api`` subclasses aiohttp's
connection handler (slow-client deadlines, connection caps).  An override of a method the library
renamed is silently never called, and a changed signature breaks at run time only: the version
ranges in pyproject.toml are pinned, and this test fails first when an upgrade moves any of it.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

#: (our class, the library class it extends, the library's methods we override or call by name).
OVERRIDES = [
    ("gateway.smtp.server.GatewaySMTP", "aiosmtpd.smtp.SMTP",
     ["_getaddr", "_create_session", "_create_envelope", "connection_made", "connection_lost", "smtp_STARTTLS",
      "smtp_DATA", "push", "handle_exception"]),
    ("gateway.smtp.commands.GuardedSMTP", "aiosmtpd.smtp.SMTP",
     ["connection_made", "connection_lost", "_timeout_cb", "push", "challenge_auth", "smtp_AUTH",
      "_handle_client"]),
    ("gateway.smtp.starttls.LoopTlsSMTP", "aiosmtpd.smtp.SMTP", ["smtp_STARTTLS"]),
    ("gateway.imap.connection.Connection", "pymap.imap.IMAPConnection",
     ["run", "_exec", "write_response", "readline", "read_continuation", "read_command", "authenticate",
      "read_idle_done", "start_tls", "send_error_disconnect", "idle"]),
    ("gateway.imap.connection.SessionState", "pymap.imap.state.ConnectionState",
     ["do_greeting", "do_command", "do_list"]),
    ("gateway.imap.search.BoundedSearchSession", "pymap.backend.maildir.Session", ["search_mailbox"]),
    ("gateway.imap.search._FetchGated", "pymap.backend.maildir.Session", ["fetch_messages"]),
    ("gateway.imap.server._Config", "pymap.backend.maildir.Config",
     ["tls_auth", "greeting", "commands", "login_capability"]),
    ("gateway.imap.storage.SafeLayout", "pymap.backend.maildir.layout.DefaultLayout",
     ["_get_path", "add_folder", "rename_folder"]),
    ("gateway.imap.storage._RawMailboxData", "pymap.backend.maildir.mailbox.MailboxData",
     ["_get_maildir_msg", "reset", "append", "copy"]),
    ("gateway.imap.storage.RawMailboxSet", "pymap.backend.maildir.mailbox.MailboxSet", ["get_mailbox"]),
    ("gateway.api.transport.GuardedHandler", "aiohttp.web_protocol.RequestHandler",
     ["connection_made", "connection_lost", "data_received", "pause_writing", "resume_writing", "force_close",
      "handle_error", "transport"]),
]  # fmt: skip

#: Private attributes of library objects our code reads or sets.
ATTRIBUTES = [
    ("aiosmtpd.smtp.SMTP", ["_reader", "_writer", "transport", "session", "envelope", "event_handler"]),
]


def test_the_api_handler_keeps_aiohttp_s_loop_and_keepalive_parameters() -> None:
    """``gateway/api/transport.py`` reads the handler's ``_loop`` and passes the keep-alive and
    head-size bounds by name: a rename would silently drop a slow-client deadline."""
    from aiohttp.web_protocol import RequestHandler

    params = inspect.signature(RequestHandler.__init__).parameters
    for name in ("keepalive_timeout", "max_line_size", "max_field_size", "max_headers", "lingering_time",
                 "access_log", "loop"):
        assert name in params, f"aiohttp's RequestHandler no longer takes {name}"
    assert "self._loop" in inspect.getsource(RequestHandler), "RequestHandler no longer keeps _loop"


def _load(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _params(fn: object) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()]  # type: ignore[arg-type]


@pytest.mark.parametrize(("ours", "theirs", "methods"), OVERRIDES, ids=[o[0].rsplit(".", 1)[1] for o in OVERRIDES])
def test_overridden_methods_still_exist_with_our_parameters(ours: str, theirs: str, methods: list[str]) -> None:
    mine, base = _load(ours), _load(theirs)
    assert issubclass(mine, base)
    for name in methods:
        assert hasattr(base, name), f"{theirs}.{name} is gone: {ours} overrides a method nobody calls"
        theirs_fn, mine_fn = getattr(base, name), getattr(mine, name)
        if isinstance(inspect.getattr_static(base, name), property) or not callable(theirs_fn):
            continue
        theirs_params, mine_params = _params(theirs_fn), _params(mine_fn)
        if any(p in ("args", "kwargs") for p in mine_params):
            continue
        assert theirs_params[: len(mine_params)] == mine_params[: len(theirs_params)], (
            f"{theirs}.{name}{theirs_params} no longer matches {ours}.{name}{mine_params}")


def test_private_attributes_we_use_are_still_set() -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP

    async def make() -> SMTP:
        return SMTP(handler=object())

    server = asyncio.run(make())
    for dotted, names in ATTRIBUTES:
        cls = _load(dotted)
        assert isinstance(server, cls)
        source = inspect.getsource(cls)
        for name in names:
            assert hasattr(server, name) or f"self.{name}" in source, f"{dotted} no longer has {name}"
