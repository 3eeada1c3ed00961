"""The queue tests' operator: a home on SQLite with a signing sender, a local and a remote mailbox.

``operator`` yields (settings, session factory, queue store): ``dr.martin@a.mssante.test`` (ORG, with
an S/MIME certificate and key), ``secretariat@a.mssante.test`` (local), ``ph@b.mssante.test`` (at the
trusted peer b.mssante.test, relay 127.0.0.1:9, pinned operator DN, no certificate of its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.config import load_settings
from gateway.queue.store import QueueStore

SENDER = "dr.martin@a.mssante.test"
LOCAL = "secretariat@a.mssante.test"
REMOTE = "ph@b.mssante.test"


@pytest.fixture
def operator(sqlite_home: Path) -> Iterator[tuple[Any, Any, QueueStore]]:
    settings = load_settings(sqlite_home)
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    cert, key = issue_certificate(load_dev_pki(settings.pki_dir), kind="user", email=SENDER)
    save_certificate_and_key(cert, key, settings.keys_dir / "s.pem", settings.keys_dir / "s.key")
    with transaction(factory) as s:
        admin.trust_domain(s, "b.mssante.test", relay="127.0.0.1:9", operator_dn="CN=mx.b,O=B,C=FR")
        admin.add_mailbox(s, SENDER, type="ORG")
        admin.add_mailbox(s, LOCAL, type="ORG")
        admin.add_mailbox(s, REMOTE, type="ORG")
        register_certificate(s, cert.public_bytes(serialization.Encoding.PEM), address=SENDER, purpose="smime",
                             key_path=str(settings.keys_dir / "s.key"))  # fmt: skip
    store = QueueStore(factory, settings.spool_dir, lease=timedelta(seconds=300))
    yield settings, factory, store
    engine.dispose()
