"""docker-compose.yml and the Dockerfile use only commands, options and settings that exist.

No Docker engine here: the check is static. Every ``command:`` of the compose file is
a JSON list (valid YAML); each ``mssgw`` invocation in it, and the Dockerfile's CMD,
is resolved against the click tree of ``cli.main.cli`` (subcommands, then options);
every ``MSSGW_*`` variable set must name a key of ``gateway.config.DEFAULTS`` (or be
``MSSGW_HOME``) and its value must pass the settings validation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from cli.main import cli
from gateway.config import DEFAULTS, validate

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COMMAND = re.compile(r"^\s*(?:command|CMD)\s*:?\s*(\[.*\])\s*$")
ENV_LINE = re.compile(r"^\s*(MSSGW_[A-Z_]+)\s*:\s*(.*?)\s*$")


def compose_commands() -> list[list[str]]:
    commands = []
    for line in COMPOSE.read_text(encoding="utf-8").splitlines():
        match = COMMAND.match(line)
        if match:
            commands.append(json.loads(match.group(1)))
    return commands


def dockerfile_commands() -> list[list[str]]:
    return [json.loads(m.group(1)) for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
            if (m := COMMAND.match(line))]


def mssgw_invocations() -> list[list[str]]:
    return [argv[1:] for argv in compose_commands() + dockerfile_commands() if argv and argv[0] == "mssgw"]


def resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command an argv names, and the option names it uses; fails on anything unknown."""
    command: click.Command = cli
    used: list[str] = []
    global_opts = {o for p in cli.params for o in p.opts}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            known = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
            assert name in known | global_opts, f"{' '.join(argv)}: {name} is not an option of {command.name}"
            used.append(name)
            param = next((p for p in (*command.params, *cli.params) if name in p.opts), None)
            if param is not None and not getattr(param, "is_flag", False) and "=" not in token:
                i += 1  # its value
        elif isinstance(command, click.Group):
            assert token in command.commands, f"{' '.join(argv)}: no subcommand {token!r} in {command.name}"
            command = command.commands[token]
        i += 1
    assert not isinstance(command, click.Group), f"{' '.join(argv)}: names a group, not a command"
    return command, used


def test_compose_has_the_expected_services() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for service in ("postgres:", "init-a:", "gateway-a1:", "gateway-a2:", "init-b:", "gateway-b:"):
        assert f"\n  {service}\n" in text
    assert "build: ." in text and DOCKERFILE.exists()
    assert "pip install" in DOCKERFILE.read_text(encoding="utf-8")


def test_every_mssgw_command_exists() -> None:
    invocations = mssgw_invocations()
    names = {" ".join(t for t in argv if (not t.startswith("-") and t.isidentifier()) or t in ("init", "serve"))
             for argv in invocations}
    assert any(argv[0] == "init" for argv in invocations) and any(argv[0] == "serve" for argv in invocations)
    assert names
    for argv in invocations:
        resolve(argv)
        assert "--data-dir" in argv


def test_resolver_refuses_what_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="no subcommand"):
        resolve(["servee"])
    with pytest.raises(AssertionError, match="not an option"):
        resolve(["init", "--domian", "x"])


def env_settings(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = ENV_LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip("\"'")
    for match in re.finditer(r"^ENV\s+(MSSGW_[A-Z_]+)=(\S+)", text, re.M):
        found[match.group(1)] = match.group(2)
    return found


def test_every_setting_exists_and_is_valid(tmp_path: Path) -> None:
    known = {f"MSSGW_{section.upper()}_{key.upper()}" for section, keys in DEFAULTS.items() for key in keys}
    for path in (COMPOSE, DOCKERFILE):
        env = env_settings(path.read_text(encoding="utf-8"))
        assert env or path == DOCKERFILE
        unknown = set(env) - known - {"MSSGW_HOME"}
        assert not unknown, f"{path.name} sets variables no setting reads: {sorted(unknown)}"
        values = {k: v for k, v in env.items() if k != "MSSGW_HOME"}
        validate({}, tmp_path, environ=values)  # raises ConfigError naming the key when a value is wrong
    urls = [v for k, v in env_settings(COMPOSE.read_text(encoding="utf-8")).items() if k == "MSSGW_DATABASE_URL"]
    assert urls and all(u.startswith("postgresql+psycopg://") for u in urls)
