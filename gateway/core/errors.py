"""One exception tree for everything mssgw reports on purpose, so each edge handles errors in one place.

::

    MssgwError                  an error we expect and can explain in one line (never a traceback)
    ├── ConfigurationError      settings, TLS material, PKI, relay routes: the operator must fix them
    ├── DirectoryError          people, mailboxes, domains, certificates, peers, identifiers
    │   └── NotFoundError       the thing named does not exist (CLI exit status 1)
    ├── CryptoError             S/MIME, CMS, MIME, OpenPGP, keys, trust anchors
    ├── ContentError            a message's content (health documents: XDM, CDA, INS) is malformed or inconsistent
    ├── QueueError              storing, finding or processing a queued message; local delivery
    └── OutageError             a store or service cannot answer now: try again later (SMTP 451 4.3.x)

The CLI (``cli.main.SafeGroup``) prints ``error: <message>`` for any ``MssgwError`` and exits with
its ``exit_code`` (2 by default: usage or configuration; 1 for "refused / not found").  The SMTP
edge turns an ``OutageError`` into a temporary reply and anything else into 451 4.3.0 without
its text (``gateway.smtp.handler.EdgeHandler.handle_exception``).  Subclasses that were once
``ValueError``s keep that base too, so ``except ValueError`` in callers still holds.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "ContentError", "CryptoError", "DirectoryError", "MssgwError", "NotFoundError", "OutageError",
           "QueueError"]


class MssgwError(Exception):
    """An error mssgw expects and explains in one line."""

    exit_code = 2  # the CLI's exit status for it


class ConfigurationError(MssgwError):
    """Settings, TLS material, PKI or routes are wrong or missing: the operator must fix them."""


class DirectoryError(MssgwError):
    """A directory operation cannot be done (people, mailboxes, domains, certificates, peers)."""


class NotFoundError(DirectoryError):
    """The thing named does not exist."""

    exit_code = 1


class CryptoError(MssgwError):
    """Signing, encrypting, opening or verifying failed, or a key or anchor is unusable."""


class ContentError(MssgwError):
    """A message's content (a health document package, a CDA header, an INS) is malformed or inconsistent."""


class QueueError(MssgwError):
    """The queue cannot store, find or process a message; the message says which and why."""


class OutageError(MssgwError):
    """A store or service (database, directory, spool, audit) cannot answer now: try again later."""
