"""Sealed secrets (``directory.secrets``): round trip, wrong or missing KEK, swapped rows, rotation, on both databases."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest
from sqlalchemy import select, update

from directory import secrets
from directory.db import make_engine, migrate, session_factory, transaction
from directory.models import SealedSecret
from gateway.config import validate


def _kek(source: str = "test") -> secrets.Kek:
    return secrets.Kek(os.urandom(32), source)


@pytest.fixture
def factory(database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    migrate(engine)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def test_round_trip_and_the_row_holds_no_clear_text(factory) -> None:  # type: ignore[no-untyped-def]
    kek = _kek()
    clear = b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n"
    with transaction(factory) as s:
        secrets.put(s, kek, "key:abc", clear)
    with factory() as s:
        assert secrets.read(s, kek, "key:abc") == clear
        assert secrets.read(s, kek, "key:absent") is None
        row = s.get(SealedSecret, "key:abc")
        assert row is not None and row.kek_id == kek.id and len(row.nonce) == 12
        assert b"PRIVATE KEY" not in bytes(row.ciphertext) and len(row.ciphertext) == len(clear) + 16
    # Sealing again uses a fresh nonce: the same value never gives the same ciphertext.
    with transaction(factory) as s:
        first = bytes(s.get(SealedSecret, "key:abc").ciphertext)  # type: ignore[union-attr]
        secrets.put(s, kek, "key:abc", clear)
    with factory() as s:
        assert bytes(s.get(SealedSecret, "key:abc").ciphertext) != first  # type: ignore[union-attr]
        assert secrets.read(s, kek, "key:abc") == clear


def test_another_kek_is_told_clearly_never_a_traceback(factory) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = _kek(), _kek()
    with transaction(factory) as s:
        secrets.put(s, mine, "pseudonym-salt", b"s" * 32)
    with factory() as s, pytest.raises(secrets.KekError) as info:
        secrets.read(s, theirs, "pseudonym-salt")
    message = str(info.value)
    assert "is not the one the keys were sealed with" in message and "give every node the same kek" in message
    assert theirs.id in message and mine.id in message
    assert base64.b64encode(mine.key).decode() not in message and mine.key.hex() not in message


def test_a_row_copied_under_another_name_does_not_open(factory) -> None:  # type: ignore[no-untyped-def]
    kek = _kek()
    with transaction(factory) as s:
        secrets.put(s, kek, "key:ours", b"operator key")
        secrets.put(s, kek, "key:attacker", b"attacker key")
    with transaction(factory) as s:  # the attacker's ciphertext put in place of ours (AAD = the name)
        attacker = s.get(SealedSecret, "key:attacker")
        assert attacker is not None
        s.execute(update(SealedSecret).where(SealedSecret.name == "key:ours")
                  .values(nonce=attacker.nonce, ciphertext=attacker.ciphertext))  # fmt: skip
    with factory() as s, pytest.raises(secrets.SealedSecretError, match="altered or copied from another name"):
        secrets.read(s, kek, "key:ours")
    with factory() as s:  # a flipped bit is refused the same way
        row = s.get(SealedSecret, "key:attacker")
        assert row is not None
        flipped = bytes([row.ciphertext[0] ^ 1]) + bytes(row.ciphertext[1:])
        with pytest.raises(secrets.SealedSecretError):
            secrets.open_sealed(kek, "key:attacker", row.kek_id, bytes(row.nonce), flipped)


def test_rotation_reseals_every_row_in_one_transaction(factory) -> None:  # type: ignore[no-untyped-def]
    old, new = _kek(), _kek()
    with transaction(factory) as s:
        for i in range(3):
            secrets.put(s, old, f"key:{i}", f"value {i}".encode())
    with transaction(factory) as s:
        assert secrets.rotate(s, old, new) == 3
    with factory() as s:
        assert {r.kek_id for r in s.scalars(select(SealedSecret))} == {new.id}
        assert [secrets.read(s, new, f"key:{i}") for i in range(3)] == [b"value 0", b"value 1", b"value 2"]
        with pytest.raises(secrets.KekError):
            secrets.read(s, old, "key:0")
    # A rotation from the wrong KEK changes nothing.
    with pytest.raises(secrets.KekError), transaction(factory) as s:
        secrets.rotate(s, old, _kek())
    with factory() as s:
        assert secrets.read(s, new, "key:2") == b"value 2"


def test_kek_from_file_or_environment_and_clear_errors(tmp_path: Path) -> None:
    settings = validate({}, tmp_path, environ={})
    with pytest.raises(secrets.KekError, match=r"no key-encryption key: .*kek is missing and MSSGW_KEK is not set"):
        secrets.load_kek(settings, environ={})
    assert secrets.create_kek_file(tmp_path / "kek") and not secrets.create_kek_file(tmp_path / "kek")
    assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600
    from_file = secrets.load_kek(settings, environ={})
    assert len(from_file.key) == 32 and from_file.source == str(tmp_path / "kek")
    other = os.urandom(32)
    from_env = secrets.load_kek(settings, environ={"MSSGW_KEK": base64.b64encode(other).decode()})
    assert from_env.key == other and from_env.source == "MSSGW_KEK"  # the environment wins
    with pytest.raises(secrets.KekError, match="MSSGW_KEK: a key-encryption key is 32 bytes"):
        secrets.load_kek(settings, environ={"MSSGW_KEK": "c2hvcnQ="})
    (tmp_path / "short").write_bytes(b"too short")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(secrets.KekError, match=r"keys.kek_file .*short: a key-encryption key is 32 bytes"):
        secrets.load_kek(path=tmp_path / "short", environ={})
    # A base64 file works as well (a container secret is often text).
    (tmp_path / "b64").write_text(base64.b64encode(other).decode() + "\n")
    (tmp_path / "b64").chmod(0o644)  # as a careless copy leaves it: others may read it
    with pytest.raises(secrets.KekError, match=r"can be read by other users \(mode 644\): chmod 600"):
        secrets.load_kek(path=tmp_path / "b64", environ={})
    (tmp_path / "b64").chmod(0o600)
    assert secrets.load_kek(path=tmp_path / "b64", environ={}).key == other
    # Never printed, never pickled.
    assert other.hex() not in repr(from_env) and str(base64.b64encode(other)) not in repr(from_env)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(from_env)


def test_a_new_kek_is_made_only_while_nothing_is_sealed(factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("MSSGW_KEK", raising=False)
    first = validate({}, tmp_path / "n1", environ={})
    with transaction(factory) as s:
        kek, made = secrets.ensure_kek(s, first)
        assert made and (tmp_path / "n1" / "kek").exists()
        secrets.put(s, kek, "pseudonym-salt", b"x" * 32)
    second = validate({}, tmp_path / "n2", environ={})  # a node joining without the KEK
    with factory() as s, pytest.raises(secrets.KekError, match=r"already holds 1 sealed secret.*same kek"):
        secrets.ensure_kek(s, second)
    assert not (tmp_path / "n2" / "kek").exists()


def test_a_missing_pseudonym_salt_is_remade_with_a_warning(factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Pseudonyms in the audit trail depend on the salt: a row deleted by mistake is remade (the
    gateway must run), and the log says that pseudonyms start afresh and a backup holds the old one."""
    monkeypatch.delenv("MSSGW_KEK", raising=False)
    settings = validate({}, tmp_path, environ={})
    first = secrets.pseudonym_salt(factory, settings, tmp_path / "none.salt")
    assert "pseudonyms in logs and audit records start afresh" in caplog.text
    caplog.clear()
    assert secrets.pseudonym_salt(factory, settings, tmp_path / "none.salt") == first
    assert "start afresh" not in caplog.text  # the same salt on every later start, and on every node
    with transaction(factory) as s:
        s.execute(SealedSecret.__table__.delete().where(SealedSecret.name == "pseudonym-salt"))
    assert secrets.pseudonym_salt(factory, settings, tmp_path / "none.salt") != first
    assert "restore the old row from a backup" in caplog.text


def test_a_row_no_node_can_open_is_listed_and_dropped_and_sealing_works_again(factory) -> None:  # type: ignore[no-untyped-def]
    """One row under a KEK no node has refused every new seal and every rotation, and no command
    could show or remove it."""
    ours, lost = _kek(), _kek()
    with transaction(factory) as s:
        secrets.put(s, ours, "key:ours", b"in use")
        secrets.put(s, ours, "key:altered", b"x")
        s.add(SealedSecret(name="key:stray", kek_id=lost.id, nonce=b"n" * 12, ciphertext=b"c" * 32))
    with transaction(factory) as s:
        s.execute(update(SealedSecret).where(SealedSecret.name == "key:altered").values(ciphertext=b"y" * 17))
    with factory() as s:
        assert [(e.name, e.state) for e in secrets.inventory(s, ours)] == [
            ("key:altered", "altered"), ("key:ours", "opens"), ("key:stray", "other-kek")]
    with pytest.raises(secrets.KekError), transaction(factory) as s:
        secrets.put(s, ours, "key:new", b"blocked")
    with pytest.raises(secrets.SecretNotDropped, match="in use"), transaction(factory) as s:
        secrets.drop_unopenable(s, ours, "key:ours")
    with pytest.raises(secrets.SealedSecretError, match="no sealed secret"), transaction(factory) as s:
        secrets.drop_unopenable(s, ours, "key:absent")
    # A node given a wrong KEK sees every row as other-kek: it may drop nothing (found by an outside test).
    wrong = _kek()
    with pytest.raises(secrets.KekError, match="opens none of the sealed secrets"), transaction(factory) as s:
        secrets.drop_unopenable(s, wrong, "key:ours")
    with factory() as s:
        assert secrets.read(s, ours, "key:ours") == b"in use"
    with transaction(factory) as s:
        assert secrets.drop_unopenable(s, ours, "key:stray").state == "other-kek"
        assert secrets.drop_unopenable(s, ours, "key:altered").state == "altered"
    with transaction(factory) as s:
        secrets.put(s, ours, "key:new", b"sealed again")
    with factory() as s:
        assert secrets.names(s) == ["key:new", "key:ours"]
        assert secrets.read(s, ours, "key:ours") == b"in use"
