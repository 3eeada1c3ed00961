"""Settings: every key has a default, unknown keys and wrong types are named, the environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from gateway.config import DEFAULTS, ConfigError, load_settings, render_toml, validate


def test_defaults_are_valid(tmp_path: Path) -> None:
    settings = validate({}, tmp_path, environ={})
    assert settings.domains == ["a.mssante.test"]
    assert settings.database_url == f"sqlite:///{tmp_path / 'mssgw.db'}"
    assert settings.listen("inbound") == ("127.0.0.1", 1025) and settings.listen("metrics") is None


def test_rendered_file_round_trips(tmp_path: Path) -> None:
    (tmp_path / "mssgw.toml").write_text(render_toml({"operator": {"domains": ["x.mssante.test"]}}), encoding="utf-8")
    settings = load_settings(tmp_path)
    assert settings.domains == ["x.mssante.test"]
    assert settings.values == validate({"operator": {"domains": ["x.mssante.test"]}}, tmp_path, environ={}).values
    for section, keys in DEFAULTS.items():
        assert set(settings.values[section]) == set(keys)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"operator": {"domian": ["x"]}}, "operator.domian: unknown key"),
        ({"operatr": {}}, "unknown section [operatr]"),
        ({"limits": {"max_recipients": "many"}}, "limits.max_recipients: expected an integer"),
        ({"limits": {"max_recipients": True}}, "limits.max_recipients: expected an integer"),
        ({"limits": {"max_recipients": -1}}, "limits.max_recipients: must not be negative"),
        ({"queue": {"lifetime_hours": "soon"}}, "queue.lifetime_hours: expected a number"),
        ({"database": {"echo": "maybe"}}, "database.echo: expected true or false"),
        ({"operator": {"domains": "a.fr"}}, None),
        ({"operator": {"domains": [1]}}, "operator.domains: expected a list of strings"),
        ({"operator": {"domains": []}}, "operator.domains: at least one"),
        ({"listen": {"inbound": "localhost"}}, "listen.inbound: expected HOST:PORT"),
        ({"listen": {"inbound": "127.0.0.1:70000"}}, "listen.inbound: port out of range"),
        ({"tls": {"min_version": "TLSv1.0"}}, "tls.min_version"),
        ({"tls": {"cert": 5}}, "tls.cert: expected a string"),
    ],
)
def test_validation_names_the_key(tmp_path: Path, raw: dict, message: str | None) -> None:  # type: ignore[type-arg]
    if message is None:
        assert validate(raw, tmp_path, environ={}).domains == ["a.fr"]
        return
    with pytest.raises(ConfigError) as info:
        validate(raw, tmp_path, environ={})
    assert message in str(info.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    raw = {"queue": {"workers": 2}, "database": {"url": "sqlite:///file.db"}}
    env = {"MSSGW_QUEUE_WORKERS": "8", "MSSGW_DATABASE_URL": "postgresql+psycopg://u@db/mssgw",
           "MSSGW_OPERATOR_DOMAINS": "x.mssante.test, y.mssante.test", "MSSGW_DATABASE_ECHO": "yes"}
    settings = validate(raw, tmp_path, environ=env)
    assert settings.queue.workers == 8
    assert settings.database_url == "postgresql+psycopg://u@db/mssgw"
    assert settings.domains == ["x.mssante.test", "y.mssante.test"] and settings.database.echo is True
    with pytest.raises(ConfigError, match=r"queue\.workers: expected an integer"):
        validate({}, tmp_path, environ={"MSSGW_QUEUE_WORKERS": "lots"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mssgw init"):
        load_settings(tmp_path)
    (tmp_path / "mssgw.toml").write_text("[operator\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(tmp_path)


def test_cli_reports_an_unknown_key_in_one_line(sqlite_home: Path) -> None:
    path = sqlite_home / "mssgw.toml"
    text = path.read_text(encoding="utf-8")
    assert "retention_days = 183" in text
    path.write_text(text.replace("retention_days = 183", "retention_dayz = 3"), encoding="utf-8")
    result = CliRunner().invoke(cli, ["--data-dir", str(sqlite_home), "domains", "list"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: audit.retention_dayz: unknown key"


def test_every_section_is_a_typed_attribute(tmp_path: Path) -> None:
    """Settings are read as typed objects (``settings.queue.lease_seconds``), never by string keys."""
    import dataclasses

    from gateway.config import SECTIONS, Settings

    settings = validate({"queue": {"lease_seconds": 42}}, tmp_path, environ={"MSSGW_LIMITS_MAX_RECIPIENTS": "7"})
    fields = {f.name for f in dataclasses.fields(Settings)}
    for name, cls in SECTIONS.items():
        if name == "listen":  # settings.listen(name) parses HOST:PORT
            continue
        assert name in fields, f"section [{name}] has no typed attribute on Settings"
        section = getattr(settings, name)
        assert isinstance(section, cls)
        for f in dataclasses.fields(cls):
            assert isinstance(getattr(section, f.name), type(f.default) if f.default is not dataclasses.MISSING
                              else list), f"{name}.{f.name}"  # fmt: skip
    assert settings.queue.lease_seconds == 42.0 and isinstance(settings.queue.lease_seconds, float)
    assert settings.limits.max_recipients == 7
    assert not hasattr(settings, "get")
