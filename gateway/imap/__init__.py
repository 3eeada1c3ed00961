"""IMAP access to local mailboxes: pymap over the Maildirs ``gateway.delivery.maildir`` writes.

``server.start_imap`` runs the service (see its module docstring for the login,
TLS, isolation and delegation rules); ``autoconfig`` renders client settings.
"""

from gateway.imap.server import ImapService, start_imap

__all__ = ["ImapService", "start_imap"]
