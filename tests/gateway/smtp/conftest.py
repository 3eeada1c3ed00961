"""Fixtures of the SMTP tests: peer certificates (once per run) and a running gateway per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from smtp_world import DOMAIN, CertFiles, PeerCerts, World, populate, started, write_settings

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from gateway.config import load_settings


@pytest.fixture(scope="session")
def peer_certs(pki_template: Path, tmp_path_factory: pytest.TempPathFactory) -> PeerCerts:
    out = tmp_path_factory.mktemp("peer-certs")
    pki = load_dev_pki(pki_template)

    def issue(name: str, **kwargs: object) -> tuple[CertFiles, str]:
        cert, key = issue_certificate(pki, **kwargs)  # type: ignore[arg-type]
        files = CertFiles(out / f"{name}.pem", out / f"{name}.key")
        save_certificate_and_key(cert, key, files.cert, files.key)
        return files, cert.subject.rfc4514_string()

    app, _ = issue("app", kind="app", email=f"app@{DOMAIN}")
    peer_b, subject_b = issue("peer-b", kind="operator", dns_names=["mx.b.mssante.test", "b.mssante.test"],
                              organization="Operateur B")
    peer_c, _ = issue("peer-c", kind="operator", dns_names=["mx.c.mssante.test", "c.mssante.test"])
    ca = trustme.CA()
    leaf = ca.issue_cert("b.mssante.test")
    foreign = CertFiles(out / "foreign.pem", out / "foreign.key")
    leaf.cert_chain_pems[0].write_to_path(foreign.cert)
    leaf.private_key_pem.write_to_path(foreign.key)
    return PeerCerts(app, peer_b, peer_c, foreign, subject_b)


@pytest.fixture
def gateway_home(sqlite_home: Path, peer_certs: PeerCerts) -> Path:
    write_settings(sqlite_home)
    populate(load_settings(sqlite_home), peer_certs)
    return sqlite_home


@pytest.fixture
async def world(gateway_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    async with started(gateway_home, peer_certs) as running_world:
        yield running_world




@pytest.fixture
async def world_any_db(operator_home: Path, peer_certs: PeerCerts) -> AsyncIterator[World]:
    """The same world on SQLite and on PostgreSQL (``operator_home`` is parametrised)."""
    write_settings(operator_home)
    populate(load_settings(operator_home), peer_certs)
    async with started(operator_home, peer_certs) as running_world:
        yield running_world
