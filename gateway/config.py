"""Settings of one operator, read from ``DIR/mssgw.toml`` and validated at start.

Every key has a default (see ``DEFAULTS``); an unknown key or a value of the wrong
kind is an error that names the key, so a typo never silently falls back to a
default. Environment variables ``MSSGW_<SECTION>_<KEY>`` override the file (for
containers), e.g. ``MSSGW_DATABASE_URL``.

The operator's home folder is ``--data-dir`` on any command, else ``$MSSGW_HOME``,
else ``./mssgw-data``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.errors import ConfigurationError

DEFAULT_HOME = "mssgw-data"
CONFIG_NAME = "mssgw.toml"
#: The listeners of ``tls.request_client_cert`` (the SMTP and HTTPS edges; IMAP never asks).
CLIENT_CERT_LISTENERS = ("submission", "submissions", "inbound", "api")

# --- the settings, section by section: each key typed, with its default ---------------------------------

@dataclass(frozen=True)
class OperatorSettings:
    """[operator]"""

    domains: list[str] = field(default_factory=lambda: ["a.mssante.test"])  # mail domains this operator serves (local mailboxes)
    hostname: str = "localhost"  # our host name: TLS certificate, HELO, Received headers
    organisation: str = ""  # the operator's name, shown in receipts


@dataclass(frozen=True)
class ListenSettings:
    """[listen]"""

    submission: str = "127.0.0.1:1587"  # STARTTLS submission for mail clients and software
    submissions: str = "127.0.0.1:1465"  # implicit TLS submission
    inbound: str = "127.0.0.1:1025"  # peer operators (mutual TLS)
    imap: str = "127.0.0.1:1143"  # IMAP with STARTTLS
    imaps: str = "127.0.0.1:1993"  # IMAP over implicit TLS
    metrics: str = ""  # "127.0.0.1:9125" serves Prometheus text at /metrics; empty: off
    api: str = "127.0.0.1:1443"  # HTTPS API for software (client certificates); empty: off


@dataclass(frozen=True)
class DatabaseSettings:
    """[database]"""

    url: str = ""  # empty: sqlite under the data folder; or postgresql+psycopg://user:pw@host/db
    echo: bool = False


@dataclass(frozen=True)
class TlsSettings:
    """[tls]"""

    cert: str = ""  # server certificate chain (PEM); empty: the development PKI's
    key: str = ""
    client_ca: str = ""  # CA(s) that issue client certificates of software and peer operators
    operator_cert: str = ""  # our client certificate towards peer operators (mutual TLS)
    operator_key: str = ""
    min_version: str = "TLSv1.2"
    # Listeners that ask clients for a certificate and name the CAs they accept: those software uses
    # (api; submission or submissions when that port is set aside for software). The clinicians'
    # ports do not ask (a smart-card user would get a certificate picker); inbound always asks.
    request_client_cert: list[str] = field(default_factory=lambda: ["api"])


@dataclass(frozen=True)
class LimitsSettings:
    """[limits]"""

    max_message_size: int = 50 * 1024 * 1024  # bytes, advertised with SIZE (RFC 1870)
    max_recipients: int = 100  # per message; more answer 452 4.5.3
    max_line_length: int = 998  # RFC 5322 2.1.1, without CRLF
    session_timeout: int = 300  # seconds of client silence before the session is closed


@dataclass(frozen=True)
class AuthSettings:
    """[auth]"""

    max_failures: int = 5  # failures before a temporary lockout
    lockout_seconds: int = 900
    base_delay: float = 0.5  # seconds; doubles with each failure (exponential delay)
    max_delay: float = 8.0


@dataclass(frozen=True)
class QueueSettings:
    """[queue]"""

    lifetime_hours: float = 120.0  # 5 days, then the message bounces with a DSN
    delay_warning_hours: float = 4.0  # a delay DSN is sent once after this
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    lease_seconds: float = 300.0  # a claim held longer than this by a dead worker is taken back
    workers: int = 4


@dataclass(frozen=True)
class CryptoSettings:
    """[crypto]"""

    sign_with_organisation: bool = True  # sign with the domain's operator certificate when the sender has none
    encrypt_for_sender: bool = True
    outer_subject: str = "Message securise"
    banner: bool = True  # add a short human-readable verification banner on inbound messages
    banner_language: str = "fr"  # fr | en: the language of that banner (the clinicians')
    require_signature_inbound: bool = True
    crl_soft_fail: bool = True  # a stale CRL is accepted with a warning in the verification header
    # S/MIME 4.0 sending (RFC 8551): the cipher for recipients whose certificate announces no
    # capabilities (one that lists capabilities without GCM gets aes-256-cbc), RSA key transport
    # and RSA signature schemes.  Receiving accepts all of them whatever these say.
    content_encryption: str = "aes-256-gcm"  # aes-256-gcm | aes-128-gcm | aes-256-cbc
    rsa_key_transport: str = "pkcs1v15"  # pkcs1v15 | oaep (RSAES-OAEP SHA-256, RFC 3560)
    rsa_signature: str = "pkcs1v15"  # pkcs1v15 | pss (RSASSA-PSS SHA-256, RFC 4056)


@dataclass(frozen=True)
class AuditSettings:
    """[audit]"""

    retention_days: int = 183  # about 6 months
    # This node's audit chain when several nodes share one PostgreSQL (a distinct name each,
    # e.g. MSSGW_AUDIT_NODE=a1): nodes then never wait for each other's audit records.
    node: str = ""


@dataclass(frozen=True)
class ReceiptsSettings:
    """[receipts]"""

    mdn_processed: bool = True
    dsn_on_quarantine: bool = True
    # MDNs as RFC 8098 writes them ("rfc8098": a message we could not accept is "processed/error",
    # From our postmaster) or as the Direct Project's delivery-notification guide does ("direct":
    # "failed", From the final recipient), for trust spaces whose peers expect that form.
    mdn_profile: str = "rfc8098"


@dataclass(frozen=True)
class RelaySettings:
    """[relay]"""

    mx_port: int = 25  # SMTP port of the MX hosts of domains routed by their MX records (RFC 5321 5.1)
    nameservers: list[str] = field(default_factory=lambda: [])  # "IP" or "IP:PORT" ("[v6]:PORT"); empty: the system resolver (/etc/resolv.conf)
    dns_timeout: float = 10.0  # seconds allowed for one DNS lookup (all nameservers together)


@dataclass(frozen=True)
class RuntimeSettings:
    """[runtime]"""

    event_loop: str = "uvloop"  # uvloop (TLS and sockets in C: about half the CPU per message) or asyncio


@dataclass(frozen=True)
class ApiSettings:
    """[api]"""

    rate_per_minute: int = 600  # requests per client certificate (token bucket), then 429
    burst: int = 60  # requests a certificate may make at once before the rate applies
    idempotency_hours: float = 24.0  # how long an Idempotency-Key's first answer is kept
    events_poll_seconds: float = 1.0  # how often an event stream looks at the queue and the mailbox
    # Slow clients (slowloris) are cut off; an event stream (GET /v1/events) is long-lived by design
    # and none of these deadlines applies while it is open.
    handshake_seconds: float = 10.0  # the TLS handshake must be over within this of the TCP accept
    head_seconds: float = 10.0  # a request head (line and fields) within this of its first byte
    idle_seconds: float = 60.0  # a connection without a request (keep-alive, or just opened) is closed then
    body_min_rate: int = 8192  # octets/s a request body must average after body_grace_seconds, else 408
    body_grace_seconds: float = 10.0  # the start any request body gets before body_min_rate counts
    max_connections: int = 1000  # open connections (after the handshake) in all; over it: 503, closed
    max_connections_per_ip: int = 100  # open connections from one address; over it: 503, closed
    # A connection without a client certificate can only get 403 (or /v1/openapi.json): counted apart from
    # max_connections, closed at once over this, head_seconds to send its request, closed after one answer.
    max_anonymous_connections: int = 64


@dataclass(frozen=True)
class MailboxesSettings:
    """[mailboxes]"""

    # Mailbox types whose messages the gateway copies into the sender's Sent folder. People read
    # over IMAP and their client saves its own copy (a second one would be a duplicate); software
    # (APP) saves none. The HTTP API always gets a copy; `mssgw directory sent-copy` overrides both.
    server_sent_copy: list[str] = field(default_factory=lambda: ["APP"])


@dataclass(frozen=True)
class DocumentsSettings:
    """[documents]"""

    # An IHE XDM package with a CDA but without X-MSS-CODECDA/X-MSS-INS (MSSanté Ref. #2 ECO.2.4):
    # "add" the fields from the package at submission, or "refuse" the message (554 5.6.0).
    missing_headers: str = "add"


@dataclass(frozen=True)
class KeysSettings:
    """[keys]"""

    # The key-encryption key (32 random bytes, mode 0600) that seals private keys, OpenPGP secret keys
    # and the pseudonym salt in the database; every node of one database needs the same one. Empty:
    # DATA/kek (made by `mssgw init`). The environment variable MSSGW_KEK (base64 of 32 bytes) wins.
    kek_file: str = ""


#: Every section of ``mssgw.toml`` and its typed value.  The fields, their defaults and the
#: comments are the reference of every key (README "Configuration" summarises them).
SECTIONS: dict[str, type] = {"operator": OperatorSettings, "listen": ListenSettings, "database": DatabaseSettings, "tls": TlsSettings, "limits": LimitsSettings, "auth": AuthSettings, "queue": QueueSettings, "crypto": CryptoSettings, "audit": AuditSettings, "receipts": ReceiptsSettings, "relay": RelaySettings, "runtime": RuntimeSettings, "api": ApiSettings, "mailboxes": MailboxesSettings, "documents": DocumentsSettings, "keys": KeysSettings}

#: Every section, key and default value (derived from ``SECTIONS``): the type of the default is the
#: type of the key, checked when the file and the environment are read.
DEFAULTS: dict[str, dict[str, Any]] = {name: asdict(cls()) for name, cls in SECTIONS.items()}


#: Keys whose value is one of a few names (S/MIME algorithm choices, see gateway.crypto.envelope).
_CRYPTO_CHOICES: dict[str, tuple[str, ...]] = {
    "content_encryption": ("aes-256-gcm", "aes-128-gcm", "aes-256-cbc"),
    "rsa_key_transport": ("pkcs1v15", "oaep"),
    "rsa_signature": ("pkcs1v15", "pss"),
}


class ConfigError(ConfigurationError):
    """A setting is missing, unknown or of the wrong kind; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """Validated settings of one operator: one typed object per section (``settings.queue.lease_seconds``).

    ``listen`` is a method (``settings.listen("imap") -> (host, port) | None``) rather than a section."""

    home: Path
    values: dict[str, dict[str, Any]] = field(repr=False)
    operator: OperatorSettings = field(init=False, repr=False)
    database: DatabaseSettings = field(init=False, repr=False)
    tls: TlsSettings = field(init=False, repr=False)
    limits: LimitsSettings = field(init=False, repr=False)
    auth: AuthSettings = field(init=False, repr=False)
    queue: QueueSettings = field(init=False, repr=False)
    crypto: CryptoSettings = field(init=False, repr=False)
    audit: AuditSettings = field(init=False, repr=False)
    receipts: ReceiptsSettings = field(init=False, repr=False)
    relay: RelaySettings = field(init=False, repr=False)
    runtime: RuntimeSettings = field(init=False, repr=False)
    api: ApiSettings = field(init=False, repr=False)
    mailboxes: MailboxesSettings = field(init=False, repr=False)
    documents: DocumentsSettings = field(init=False, repr=False)
    keys: KeysSettings = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if name != "listen":
                object.__setattr__(self, name, cls(**self.values[name]))

    # Frequently used settings, named.
    @property
    def domains(self) -> list[str]:
        return [d.lower() for d in self.operator.domains]

    @property
    def hostname(self) -> str:
        return self.operator.hostname

    @property
    def database_url(self) -> str:
        url = self.database.url
        return url or f"sqlite:///{self.home / 'mssgw.db'}"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def mail_dir(self) -> Path:
        return self.home / "mail"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def gnupg_dir(self) -> Path:
        return self.home / "gnupg"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    def path(self, section: str, key: str, default: Path) -> Path:
        """A path setting, relative to the home folder, or ``default`` when empty."""
        raw = str(self.values[section][key])
        if not raw:
            return default
        p = Path(raw)
        return p if p.is_absolute() else self.home / p

    def listen(self, name: str) -> tuple[str, int] | None:
        raw = str(self.values["listen"][name])
        if not raw:
            return None
        return parse_hostport(raw, f"listen.{name}")


def parse_hostport(raw: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a tuple; the error names the key."""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {raw!r}")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: port out of range in {raw!r}")
    return host.strip("[]"), int(port)


def parse_nameserver(raw: str, key: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``v6`` or ``[v6]:PORT`` to (address, port); port 53 by default."""
    text = raw.strip()
    port = "53"
    if text.startswith("["):
        address, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{key}: expected IP or IP:PORT, got {raw!r}")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address = text
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{key}: {address!r} is not an IP address (in {raw!r})") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: bad port in {raw!r}")
    return address, int(port)


def resolve_home(data_dir: str | os.PathLike[str] | None) -> Path:
    """The operator's home folder: the option, else ``$MSSGW_HOME``, else ``./mssgw-data``."""
    chosen = data_dir or os.environ.get("MSSGW_HOME") or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{where}: must not be negative, got {number}")
        return number
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number_f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if number_f < 0:
            raise ConfigError(f"{where}: must not be negative, got {number_f}")
        return number_f
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def validate(raw: dict[str, Any], home: Path, environ: dict[str, str] | None = None) -> Settings:
    """Merge ``raw`` (parsed TOML) and the environment over the defaults, checking every key."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, dict[str, Any]] = {s: dict(keys) for s, keys in DEFAULTS.items()}
    for section, table in raw.items():
        if section not in DEFAULTS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(DEFAULTS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        for key, value in table.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[section][key] = _coerce(section, key, value, DEFAULTS[section][key])
    for section, keys in DEFAULTS.items():
        for key in keys:
            env_name = f"MSSGW_{section.upper()}_{key.upper()}"
            if env_name in environ:
                values[section][key] = _coerce(section, key, environ[env_name], DEFAULTS[section][key])
    settings = Settings(home=home, values=values)
    if not settings.domains:
        raise ConfigError("operator.domains: at least one mail domain is needed")
    for name in DEFAULTS["listen"]:
        settings.listen(name)
    if values["tls"]["min_version"] not in {"TLSv1.2", "TLSv1.3"}:
        raise ConfigError("tls.min_version: must be TLSv1.2 or TLSv1.3")
    if not 0 < values["relay"]["mx_port"] < 65536:
        raise ConfigError(f"relay.mx_port: must be a port between 1 and 65535, got {values['relay']['mx_port']}")
    for raw_ns in values["relay"]["nameservers"]:
        parse_nameserver(raw_ns, "relay.nameservers")
    if values["relay"]["dns_timeout"] <= 0:
        raise ConfigError("relay.dns_timeout: must be more than 0 seconds")
    if values["runtime"]["event_loop"] not in {"uvloop", "asyncio"}:
        raise ConfigError("runtime.event_loop: must be uvloop or asyncio")
    if values["documents"]["missing_headers"] not in {"add", "refuse"}:
        raise ConfigError("documents.missing_headers: must be add or refuse")
    bad_types = [t for t in values["mailboxes"]["server_sent_copy"] if str(t).upper() not in {"PER", "ORG", "APP"}]
    if bad_types:
        raise ConfigError(f"mailboxes.server_sent_copy: mailbox types are PER, ORG and APP, got {bad_types!r}")
    bad_listeners = [n for n in values["tls"]["request_client_cert"] if n not in CLIENT_CERT_LISTENERS]
    if bad_listeners:
        raise ConfigError(f"tls.request_client_cert: listeners are {', '.join(CLIENT_CERT_LISTENERS)}, "
                          f"got {bad_listeners!r}")
    if values["crypto"]["banner_language"] not in {"fr", "en"}:
        raise ConfigError(f"crypto.banner_language: must be fr or en, got {values['crypto']['banner_language']!r}")
    if values["receipts"]["mdn_profile"] not in {"rfc8098", "direct"}:
        raise ConfigError("receipts.mdn_profile: must be rfc8098 or direct")
    for key, allowed in _CRYPTO_CHOICES.items():
        if values["crypto"][key] not in allowed:
            raise ConfigError(f"crypto.{key}: must be one of {', '.join(allowed)}, got {values['crypto'][key]!r}")
    return settings


def load_settings(data_dir: str | os.PathLike[str] | None = None, *, must_exist: bool = True) -> Settings:
    """Read and validate ``HOME/mssgw.toml``."""
    home = resolve_home(data_dir)
    path = home / CONFIG_NAME
    if not path.exists():
        if must_exist:
            raise ConfigError(f"no {CONFIG_NAME} in {home}: run 'mssgw init --data-dir {home}' first")
        return validate({}, home)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return validate(raw, home)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_toml(overrides: dict[str, dict[str, Any]]) -> str:
    """A complete ``mssgw.toml`` with every key written out (defaults, then overrides)."""
    lines = ["# mssgw settings. Every key is shown with its value; see README.md for their meaning.", ""]
    for section, keys in DEFAULTS.items():
        lines.append(f"[{section}]")
        for key, default in keys.items():
            value = overrides.get(section, {}).get(key, default)
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
