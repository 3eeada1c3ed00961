"""Helpers of the API tests: the running gateway, its directory, client certificates, httpx and curl.

The operator a.mssante.test of the SMTP tests (``smtp_world.populate``: sec@, bob@, app@ with its
registered certificate, old@ deactivated, trusted peers b. and c.) plus: app2@ (APP, its
certificate revoked in the directory and the CA's CRL), dr@ (a PER mailbox with a registered
certificate: not software), and sec@ delegated to app@. Certificates: app, app2, dr, an
unregistered one from our CA, and one from a CA nobody trusts (trustme).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme
from smtp_world import DOMAIN, CertFiles, PeerCerts, free_port, populate, write_settings

from certs.pki import issue_certificate, load_dev_pki, save_certificate_and_key
from directory import admin
from directory.certificates import register_certificate
from directory.db import make_engine, session_factory, transaction
from gateway.app import Gateway
from gateway.config import Settings, load_settings

APP = f"app@{DOMAIN}"
APP2 = f"app2@{DOMAIN}"
DR = f"dr@{DOMAIN}"
SEC = f"sec@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
DR_RPPS = "10000000009"


@dataclass(frozen=True)
class ApiCerts:
    app: CertFiles  # app@ (APP), registered tls-client
    app2: CertFiles  # app2@ (APP), registered then revoked
    dr: CertFiles  # dr@ (PER), registered tls-client: not a software mailbox
    stranger: CertFiles  # from our CA, registered for nobody
    foreign: CertFiles  # from a CA we do not trust
    peer: PeerCerts  # what smtp_world.populate expects


def issue_api_certs(pki_template: Path, out: Path) -> ApiCerts:
    pki = load_dev_pki(pki_template)

    def issue(name: str, **kwargs: Any) -> CertFiles:
        cert, key = issue_certificate(pki, **kwargs)
        files = CertFiles(out / f"{name}.pem", out / f"{name}.key")
        save_certificate_and_key(cert, key, files.cert, files.key)
        return files

    app = issue("app", kind="app", email=APP)
    ca = trustme.CA()
    leaf = ca.issue_cert(APP)
    foreign = CertFiles(out / "foreign.pem", out / "foreign.key")
    leaf.cert_chain_pems[0].write_to_path(foreign.cert)
    leaf.private_key_pem.write_to_path(foreign.key)
    peer = PeerCerts(app, app, app, foreign, "CN=unused")
    return ApiCerts(app, issue("app2", kind="app", email=APP2), issue("dr", kind="app", email=DR),
                    issue("stranger", kind="app", email=f"nobody@{DOMAIN}"), foreign, peer)


def prepare_home(home: Path, certs: ApiCerts, extra: dict[str, dict[str, object]] | None = None) -> None:
    """Settings with the API on a free port, then the directory of the module docstring."""
    settings_extra: dict[str, dict[str, object]] = {"listen": {"api": f"127.0.0.1:{free_port()}"},
                                                    "api": {"burst": 1000, "events_poll_seconds": 0.1}}
    for section, values in (extra or {}).items():
        settings_extra.setdefault(section, {}).update(values)
    write_settings(home, settings_extra)
    settings = load_settings(home)
    populate(settings, certs.peer)
    engine = make_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as db:
            admin.add_mailbox(db, APP2, type="APP", display_name="Old software")
            register_certificate(db, certs.app2.cert.read_bytes(), address=APP2, purpose="tls-client")
            admin.add_practitioner(db, identifier=DR_RPPS, last_name="Martin", first_name="Anne",
                                   profession_code="10")
            admin.add_mailbox(db, DR, type="PER", rpps=DR_RPPS)
            register_certificate(db, certs.dr.cert.read_bytes(), address=DR, purpose="tls-client")
            admin.delegate(db, SEC, APP)
        with transaction(session_factory(engine)) as db:
            from certs.service import revoke

            revoke(db, settings, APP2, reason="key-compromise")
    finally:
        engine.dispose()


@dataclass
class ApiWorld:
    home: Path
    settings: Settings
    gateway: Gateway
    certs: ApiCerts

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    @property
    def port(self) -> int:
        return self.gateway.addresses["api"][1]

    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}"

    def context(self, cert: CertFiles | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        return ctx

    def client(self, cert: CertFiles | None = None) -> httpx.AsyncClient:
        """httpx against the real listener (default: app@'s certificate)."""
        return httpx.AsyncClient(base_url=self.base, verify=self.context(cert or self.certs.app), timeout=20)

    async def curl(self, method: str, path: str, *, cert: CertFiles | None = None, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """curl (OpenSSL) against the listener: (status, response headers, body)."""
        cert = cert or self.certs.app
        args = ["curl", "-sS", "-X", method, "--resolve", f"localhost:{self.port}:127.0.0.1", "--cacert", str(self.ca),
                "--cert", str(cert.cert), "--key", str(cert.key), "-D", "-", "--max-time", "20"]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        if body is not None:
            args += ["--data-binary", "@-"]
        args.append(self.base + path)
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(body)
        assert proc.returncode == 0, err.decode()
        head, _, payload = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return status, fields, payload


@asynccontextmanager
async def started_api(home: Path, certs: ApiCerts) -> AsyncIterator[ApiWorld]:
    """The gateway's listeners including the API (no workers, no IMAP), stopped afterwards."""
    settings = load_settings(home)
    gateway = Gateway(settings, workers=False, imap=False)
    await gateway.start()
    try:
        yield ApiWorld(home, settings, gateway, certs)
    finally:
        await gateway.stop(grace=5)


def new_message(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"from": APP, "to": [BOB], "subject": "Resultats", "text": "Bonjour.\n"}
    body.update(fields)
    return body


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


async def read_until_closed(reader: asyncio.StreamReader, wait: float = 20.0) -> bytes:
    """Everything until the server closes (a reset counts as closed); fails after ``wait`` seconds."""
    out = b""
    async with asyncio.timeout(wait):
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            while chunk := await reader.read(65536):
                out += chunk
    return out
