"""docker-compose.yml: two operators that exchange mail out of the box, checked against the code.

The file is read with PyYAML (anchors and ``<<`` merges resolved as compose resolves them). There
is usually no Docker engine here: when ``docker compose`` is installed, ``docker compose config``
must accept the file too; when it is not, the test does not skip: the same structure is checked
statically.

What is checked is what made the old file unable to exchange mail: every ``mssgw`` command line
(compose file, Dockerfile, setup script with its arguments filled in) parses with the real click
CLI; every ``MSSGW_*`` variable is a settings key with a valid value; the names peers relay to
are services (or their network aliases) and are the names their certificates carry; the setup
steps exchange peer bundles through a shared volume in the right order; ports are published on
127.0.0.1 only; each gateway has a healthcheck on its own listeners. Finally the setup script
itself runs, with the compose file's arguments, on two temporary homes, and each side must trust
the other with the right route, CA and operator DN.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from cli.main import cli
from gateway.config import DEFAULTS, validate
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETUP = ROOT / "deploy" / "compose-setup.sh"
SETUP_IN_IMAGE = "mssgw-compose-setup"
SETTING_KEYS = {f"MSSGW_{s.upper()}_{k.upper()}" for s, keys in DEFAULTS.items() for k in keys}
KEK_VARIABLE = "MSSGW_KEK"  # not a setting: the key-encryption key itself (directory.secrets)


def interpolated(value: str) -> str:
    """``${VAR:-default}`` as compose gives it when VAR is not set."""
    found = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return found.group(1) if found else value


@dataclass
class Service:
    """What the checks need of one compose service (anchors and merges already resolved)."""

    name: str
    spec: dict[str, Any]
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)  # mount point -> volume name
    ports: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    depends_on: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return {self.name, *self.aliases}


def _compose(text: str | None = None) -> dict[str, Any]:
    """The compose file as data, anchors and ``<<`` merges resolved by PyYAML."""
    data = yaml.safe_load(text if text is not None else COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def _as_list(value: Any) -> list[str]:
    """A compose string-or-list field (command, healthcheck test) as a list."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def services(text: str | None = None) -> dict[str, Service]:
    found: dict[str, Service] = {}
    for name, spec in (_compose(text).get("services") or {}).items():
        env = spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        service = Service(name, spec, command=_as_list(spec.get("command")),
                          env={str(k): str(v) for k, v in env.items()})
        for volume in spec.get("volumes") or []:
            source, target = str(volume).split(":")[:2]
            service.volumes[target] = source
        service.ports = [str(p) for p in spec.get("ports") or []]
        for network in (spec.get("networks") or {}).values() if isinstance(spec.get("networks"), dict) else []:
            service.aliases += list((network or {}).get("aliases") or [])
        deps = spec.get("depends_on") or []
        service.depends_on = list(deps) if isinstance(deps, (list, dict)) else []
        service.healthcheck = _as_list((spec.get("healthcheck") or {}).get("test"))
        found[name] = service
    return found


def declared_volumes() -> set[str]:
    return set(_compose().get("volumes") or {})


def gateways() -> list[Service]:
    return [s for s in services().values() if s.command[:2] == ["mssgw", "serve"]]


def setup_calls(step: str) -> list[tuple[Service, list[str]]]:
    """(service, arguments) of every compose service running the setup script's ``step``."""
    return [(s, s.command[2:]) for s in services().values() if s.command[:2] == [SETUP_IN_IMAGE, step]]


def script_mssgw_lines(home: str, bundles: str, args: list[str]) -> list[list[str]]:
    """The ``mssgw`` lines of the setup script's branch for ``args``, with variables filled in."""
    text = SETUP.read_text(encoding="utf-8")
    branch = re.search(rf"^    {args[0]}\)\n(.*?)^        ;;", text, re.M | re.S)
    assert branch, f"compose-setup.sh has no {args[0]!r} step"
    values = {"home": home, "bundles": bundles} | {str(i + 1): a for i, a in enumerate(args)}
    lines = []
    for line in branch.group(1).splitlines():
        if line.strip().startswith("mssgw "):
            filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line)
            lines.append(shlex.split(filled)[1:])
    return lines


def parse(argv: list[str]) -> click.Command:
    """Parse ``mssgw ARGV`` with the real click tree, down to the leaf command (nothing is run)."""
    command: click.Command = cli
    ctx = cli.make_context("mssgw", list(argv))
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return command


def all_mssgw_invocations() -> list[list[str]]:
    found = [s.command[1:] for s in services().values() if s.command[:1] == ["mssgw"]]
    found += [
        json.loads(m.group(1))[1:] for m in re.finditer(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    ]
    for step in ("init", "peer"):
        for _, args in setup_calls(step):
            found += script_mssgw_lines("/data", "/bundles", [step, *args])
    return found


# ---------------------------------------------------------------------------------------------


def test_compose_file_is_well_formed() -> None:
    """``docker compose config`` when docker compose exists; the same structure statically always."""
    found = services()
    assert {
        "postgres",
        "init-a",
        "init-b",
        "peers-a",
        "peers-b",
        "gateway-a1",
        "gateway-a2",
        "gateway-b",
        "clone-a2",
    } <= set(found)
    volumes = declared_volumes()
    assert "bundles" in volumes
    for service in found.values():
        assert service.command, f"{service.name}: no command as a JSON list"
        assert service.spec.get("image") or service.spec.get("build"), f"{service.name}: no image"
        for source in service.volumes.values():
            assert source in volumes, f"{service.name}: volume {source} is not declared"
        for dep in service.depends_on:
            assert dep in found, f"{service.name} depends on {dep}, which is no service"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_every_mssgw_command_line_parses_with_the_real_cli() -> None:
    invocations = all_mssgw_invocations()
    subcommands = {parse(argv).name for argv in invocations}  # raises click's UsageError when wrong
    assert {"init", "serve", "export", "add", "show"} <= subcommands
    for argv in invocations:
        assert "--data-dir" in argv, f"mssgw {' '.join(argv)}: which home?"


def test_the_parser_refuses_what_does_not_exist() -> None:
    with pytest.raises(click.UsageError):
        parse(["servee"])
    with pytest.raises(click.NoSuchOption):
        parse(["init", "--domian", "x"])
    with pytest.raises(click.NoSuchOption):
        parse(["peers", "add", "--form", "x.json"])


def test_the_setup_script_is_what_the_image_runs() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert f"COPY deploy/compose-setup.sh /usr/local/bin/{SETUP_IN_IMAGE}" in text
    assert "mkdir /data /bundles" in text and "chown mssgw:mssgw /data /bundles" in text


def test_every_setting_exists_and_is_valid(tmp_path: Path) -> None:
    for service in services().values():
        env = {k: v for k, v in service.env.items() if k.startswith("MSSGW_")}
        unknown = set(env) - SETTING_KEYS - {"MSSGW_HOME", KEK_VARIABLE}
        assert not unknown, f"{service.name} sets variables no setting reads: {sorted(unknown)}"
        if KEK_VARIABLE in env:  # 32 bytes in base64, or the KekError that names the variable
            from directory.secrets import load_kek

            assert len(load_kek(environ={KEK_VARIABLE: interpolated(env.pop(KEK_VARIABLE))}).key) == 32
        validate({}, tmp_path, environ=env)  # raises ConfigError naming the key when a value is wrong
        if url := env.get("MSSGW_DATABASE_URL"):
            assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    docker_env = dict(re.findall(r"^ENV\s+(MSSGW_[A-Z_]+)=(\S+)", DOCKERFILE.read_text(), re.M))
    assert docker_env == {"MSSGW_HOME": "/data"}
    # The script reads MSSGW_HOME and PEER_BUNDLES only; PEER_BUNDLES is not a setting.
    assert set(re.findall(r"\$\{(\w+):-", SETUP.read_text())) == {"MSSGW_HOME", "PEER_BUNDLES"}


def test_certificates_name_the_hosts_peers_relay_to() -> None:
    """Each init's --hostname is a network name of the gateways on that home, and is the relay."""
    by_name = services()
    inits = setup_calls("init")
    assert len(inits) == 2
    domains = {}
    for service, (domain, hostname, inbound) in inits:
        home = service.volumes["/data"]
        assert service.volumes.get("/bundles") == "bundles", f"{service.name} cannot publish its bundle"
        serving = [g for g in gateways() if g.volumes.get("/data") == home]
        assert serving, f"no gateway serves {home}"
        for gateway in serving:
            assert hostname in gateway.names(), f"{gateway.name} is not reachable as {hostname}"
            assert gateway.env["MSSGW_OPERATOR_HOSTNAME"] == hostname
            assert gateway.env["MSSGW_OPERATOR_DOMAINS"] == domain
            assert gateway.env["MSSGW_DATABASE_URL"] == service.env["MSSGW_DATABASE_URL"]
            assert inbound == f"{hostname}:{gateway.env['MSSGW_LISTEN_INBOUND'].rsplit(':', 1)[1]}"
        assert hostname not in by_name or by_name[hostname] in serving  # not shadowed by another service
        domains[domain] = (service, home)
    # Each operator adds the other, after both bundles exist, before its gateways start.
    peers = setup_calls("peer")
    assert sorted(args[0] for _, args in peers) == sorted(domains)
    for service, (peer_domain,) in peers:
        own = next(init for d, (init, home) in domains.items() if home == service.volumes["/data"])
        assert domains[peer_domain][0] is not own, f"{service.name} adds itself"
        assert {own.name, domains[peer_domain][0].name} <= set(service.depends_on)
        assert service.volumes.get("/bundles") == "bundles"
        for gateway in gateways():
            if gateway.volumes["/data"] == service.volumes["/data"]:
                assert service.name in gateway.depends_on, (
                    f"{gateway.name} may start before it trusts its peer"
                )


def test_nodes_of_one_operator_share_the_database_and_the_mail_volume_only() -> None:
    """Operator A's two nodes: one database, a home each (provisioned by ``clone`` from an init's
    home before the node starts), one audit chain each, and no volume in common but the Maildir."""
    by_db: dict[str, list[Service]] = {}
    for gateway in gateways():
        by_db.setdefault(gateway.env["MSSGW_DATABASE_URL"], []).append(gateway)
    nodes = next(group for group in by_db.values() if len(group) > 1)
    assert {g.name for g in nodes} == {"gateway-a1", "gateway-a2"}
    assert len({g.env.get("MSSGW_AUDIT_NODE") for g in nodes}) == len(nodes), "two nodes on one audit chain"
    assert all(g.env.get("MSSGW_AUDIT_NODE") for g in nodes)
    mounts = [(target, source) for g in nodes for target, source in g.volumes.items()]
    shared = {source for _, source in mounts if sum(1 for _, s in mounts if s == source) > 1}
    assert shared == {"mail-a"}, f"volumes shared by A's nodes beyond the Maildir: {shared - {'mail-a'}}"
    assert all(g.volumes.get("/data/mail") == "mail-a" for g in nodes)
    # Keys are sealed in the database: every service of A's database is given the same KEK.
    of_a = [s for s in services().values() if s.env.get("MSSGW_DATABASE_URL") == nodes[0].env["MSSGW_DATABASE_URL"]]
    assert {s.env.get(KEK_VARIABLE) for s in of_a} == {nodes[0].env[KEK_VARIABLE]}, "A's services differ in KEK"
    init_homes = {s.volumes["/data"] for s, _ in setup_calls("init")}
    clones = {s.volumes["/data"]: s for s, _ in setup_calls("clone")}
    for gateway in nodes:
        home = gateway.volumes["/data"]
        if home in init_homes:
            continue
        clone = clones.get(home)
        assert clone is not None, f"{gateway.name}'s home is neither initialised nor provisioned"
        assert clone.name in gateway.depends_on, f"{gateway.name} may start before its home is provisioned"
        assert clone.command[2:] == ["/source"] and clone.spec["volumes"][0].endswith(":/source:ro")
        source = clone.volumes["/source"]
        assert source in init_homes and source != home
        peers_of_source = [s.name for s, _ in setup_calls("peer") if s.volumes["/data"] == source]
        assert set(peers_of_source) <= set(clone.depends_on), "provisioned before the source trusts its peer"


def test_ports_are_published_on_loopback_only() -> None:
    published = []
    for service in services().values():
        for port in service.ports:
            assert port.startswith("127.0.0.1:"), f"{service.name} publishes {port} beyond this machine"
            published.append((service.name, port.rsplit(":", 1)[1]))
        if service.command[:2] != ["mssgw", "serve"]:
            assert not service.ports, f"{service.name} publishes ports"
    for name, inside in published:  # peers reach the inbound port on the compose network
        assert inside not in {"1025", "5432"}, f"{name} publishes {inside}"
    assert ("gateway-a1", "1587") in published and ("gateway-b", "1587") in published
    assert ("gateway-a1", "1993") in published and ("gateway-b", "1993") in published


def test_each_gateway_has_a_healthcheck_on_its_own_listeners() -> None:
    for gateway in gateways():
        assert gateway.healthcheck[:2] == ["CMD", "python"], gateway.name
        code = gateway.healthcheck[-1]
        compile(code, f"{gateway.name} healthcheck", "exec")
        listening = {
            v.rsplit(":", 1)[1] for k, v in gateway.env.items() if k.startswith("MSSGW_LISTEN_") and v
        }
        checked = set(re.findall(r"\b\d{4}\b", code))
        assert checked and checked <= listening, f"{gateway.name} checks {checked}, listens on {listening}"


@pytest.fixture
def operator_databases() -> Iterator[dict[str, str]]:
    """One fresh PostgreSQL database per operator, as in compose, when the suite has a server
    (``MSSGW_TEST_PG_URL``, set by scripts/test); without one, each home keeps its own SQLite."""
    server = os.environ.get("MSSGW_TEST_PG_URL")
    if not server:
        yield {}
        return
    from sqlalchemy import create_engine, text

    homes = {s.volumes["/data"] for s, _ in setup_calls("init")}
    names = {home: f"mssgw_compose_{home.replace('-', '_')}_{uuid.uuid4().hex[:8]}" for home in homes}
    admin = create_engine(
        server.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield {home: f"{base}/{name}" for home, name in names.items()}
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.timeout(300)  # ten CLI start-ups
def test_the_setup_script_connects_two_homes(tmp_path: Path, operator_databases: dict[str, str]) -> None:
    """deploy/compose-setup.sh, with the compose file's arguments, in its depends_on order."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
    base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}"
    base_env["PEER_BUNDLES"] = str(tmp_path / "bundles")
    (tmp_path / "bundles").mkdir()
    homes: dict[str, Path] = {}

    def env_of(service: Service) -> dict[str, str]:
        """The service's home volume as a folder, and its database as compose gives it (or SQLite)."""
        volume = service.volumes["/data"]
        home = homes.setdefault(volume, tmp_path / volume)
        url = operator_databases.get(volume)
        return base_env | {"MSSGW_HOME": str(home)} | ({"MSSGW_DATABASE_URL": url} if url else {})

    def run(service: Service, args: list[str]) -> str:
        done = subprocess.run(["sh", str(SETUP), *args], env=env_of(service),
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert done.returncode == 0, f"{service.name}: {done.stdout}{done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout

    inits, peers = setup_calls("init"), setup_calls("peer")
    for service, args in inits:
        run(service, ["init", *args])
    for service, args in peers:
        run(service, ["peer", *args])
    # Run again, as a second `docker compose up` does: every step is idempotent.
    for service, args in inits[:1] + peers:
        run(service, [service.command[1], *args])
    clones = setup_calls("clone")
    assert clones, "no node is provisioned from another's home"
    for _ in range(2):  # idempotent too
        for service, args in clones:
            source = homes[service.volumes["/source"]]
            run(service, ["clone", *[str(source) if a == "/source" else a for a in args]])
    for service, _ in clones:
        node, source = homes[service.volumes["/data"]], homes[service.volumes["/source"]]
        for copied in ("pki/server.key", "pki/server.pem", "pki/operator.pem", "pki/ca.pem", "mssgw.toml"):
            assert (node / copied).read_bytes() == (source / copied).read_bytes(), copied
            if copied.endswith(".key"):
                assert (node / copied).stat().st_mode & 0o077 == 0, f"{copied} readable by others"
        # No private key of the directory on the second node: they are sealed in the database.
        left = ("spool", "audit", "mail", "mssgw.db", "keys", "gnupg", "kek", "pki/operator.key", "pki/ca.key")
        assert not any((node / name).exists() for name in left)

    identity = {}
    for service, (domain, hostname, _) in inits:
        home = homes[service.volumes["/data"]]
        assert (home / "mssgw.db").exists() == (service.volumes["/data"] not in operator_databases)
        server = x509.load_pem_x509_certificate((home / "pki" / "server.pem").read_bytes())
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert hostname in names.get_values_for_type(x509.DNSName), (
            f"{domain}'s certificate does not name {hostname}"
        )
        operator = x509.load_pem_x509_certificate((home / "pki" / "operator.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((home / "pki" / "ca.pem").read_bytes())
        dn = ",".join(reversed([a.rfc4514_string() for a in operator.subject]))  # MSSanté order: C first
        identity[domain] = (dn, ca.fingerprint(hashes.SHA256()).hex())
        assert "PRIVATE KEY" not in (tmp_path / "bundles" / f"{domain}.peer.json").read_text()
    assert not list((tmp_path / "bundles").glob(".*"))  # no half-written bundle left behind
    for service, (peer_domain,) in peers:
        done = subprocess.run(["mssgw", "peers", "list", "--json"], env=env_of(service),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert [row["domain"] for row in rows] == [peer_domain], service.name  # the peer, not ourselves
        relay_host = next(hostname for _, (domain, hostname, _) in inits if domain == peer_domain)
        operator_dn, ca_fingerprint = identity[peer_domain]
        assert rows[0]["route"] == f"relay {relay_host}:1025"
        assert rows[0]["operator_dn"] == operator_dn
        assert [anchor["fingerprint"] for anchor in rows[0]["anchors"]] == [ca_fingerprint]


@pytest.mark.timeout(180)
def test_the_healthcheck_passes_on_a_live_gateway_and_fails_without(tmp_path: Path) -> None:
    """The healthcheck code itself, on a real ``mssgw serve`` (ports swapped for free ones)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSGW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    home = tmp_path / "home"
    init = subprocess.run(["mssgw", "--data-dir", str(home), "init", "--hostname", "gateway-a"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert init.returncode == 0, init.stderr
    submission, inbound = free_port(), free_port()
    listen = {f"MSSGW_LISTEN_{name}": "" for name in ("SUBMISSIONS", "IMAP", "IMAPS", "METRICS")}
    listen |= {
        "MSSGW_LISTEN_SUBMISSION": f"127.0.0.1:{submission}",
        "MSSGW_LISTEN_INBOUND": f"127.0.0.1:{inbound}",
    }
    code = gateways()[0].healthcheck[-1].replace("1587", str(submission)).replace("1025", str(inbound))

    def healthcheck() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    serve = subprocess.Popen(["mssgw", "--data-dir", str(home), "serve", "--no-workers"], env=env | listen,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert serve.stderr is not None
        for line in serve.stderr:  # wait on the event: the gateway says when every listener is bound
            if "gateway started" in line:
                break
        else:
            pytest.fail(f"mssgw serve ended before it started (status {serve.wait()})")
        assert healthcheck() == 0
    finally:
        serve.terminate()
        serve.communicate(timeout=60)
    assert healthcheck() != 0  # nothing listening any more: unhealthy
