"""Local Maildir delivery: layout, atomicity, flags, path safety, disk errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.delivery.maildir import DEFAULT_FOLDERS, DeliveryError, MaildirDelivery, folder_subdir

MESSAGE = b"From: a@a.mssante.test\r\nTo: b@a.mssante.test\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def delivery(tmp_path: Path) -> MaildirDelivery:
    return MaildirDelivery(tmp_path / "mail")


def test_mailbox_path_is_domain_then_localpart(delivery: MaildirDelivery) -> None:
    assert delivery.mailbox_path("Dr.House@A.MSSante.test") == delivery.mail_root / "a.mssante.test" / "dr.house"
    assert delivery.mailbox_path("<dr.house@a.mssante.test>") == delivery.mailbox_path("DR.HOUSE@a.mssante.test")


@pytest.mark.parametrize(
    "address",
    ["../b@x.test", "a@x.test/../../b", "a/../../b@x.test", "a/b@x.test", "a\x00@x.test", "..@x.test", "", "a@", "@x.test",
     "a@../x", "a\\b@x.test"],
)
def test_unsafe_addresses_are_refused(delivery: MaildirDelivery, address: str) -> None:
    with pytest.raises(DeliveryError):
        delivery.mailbox_path(address)


@pytest.mark.parametrize("folder", ["", "/", "a//b", "..", "a/..", "Sent.Old", "a\\b", "x\x00", "a/\n"])
def test_unsafe_folder_names_are_refused(folder: str) -> None:
    with pytest.raises(DeliveryError):
        folder_subdir(folder)


def test_folder_names_map_to_maildirplusplus() -> None:
    assert folder_subdir("INBOX") == ""
    assert folder_subdir("inbox") == ""
    assert folder_subdir("Sent") == ".Sent"
    assert folder_subdir("Projets/2024") == ".Projets.2024"


def test_ensure_folders_layout_is_pymaps(delivery: MaildirDelivery) -> None:
    delivery.ensure_folders("b@a.mssante.test")
    delivery.ensure_folders("b@a.mssante.test")  # idempotent
    base = delivery.mailbox_path("b@a.mssante.test")
    for sub in ("cur", "new", "tmp"):
        assert (base / sub).is_dir()
    for name in DEFAULT_FOLDERS:
        assert (base / f".{name}" / "maildirfolder").is_file()
        assert (base / f".{name}" / "new").is_dir()
    assert (base / "subscriptions").read_bytes() == b"Sent\r\nDrafts\r\nTrash\r\nJunk\r\n"
    assert os.stat(base).st_mode & 0o077 == 0
    assert list((base / "tmp").iterdir()) == []


def test_user_subscriptions_are_kept(delivery: MaildirDelivery) -> None:
    delivery.ensure_folders("b@a.mssante.test")
    subs = delivery.mailbox_path("b@a.mssante.test") / "subscriptions"
    subs.write_bytes(b"Sent\r\n")
    delivery.ensure_folders("b@a.mssante.test")
    assert subs.read_bytes() == b"Sent\r\n"


def test_deliver_to_inbox_lands_in_new_byte_for_byte(delivery: MaildirDelivery) -> None:
    name = delivery.deliver("B@a.mssante.test", MESSAGE)
    base = delivery.mailbox_path("b@a.mssante.test")
    assert (base / "new" / name).read_bytes() == MESSAGE
    assert ":" not in name and "/" not in name
    assert os.stat(base / "new" / name).st_mode & 0o777 == 0o600
    assert list((base / "tmp").iterdir()) == []
    assert (base / ".Sent").is_dir()  # first delivery created the default folders


def test_each_call_is_one_copy_with_a_unique_name(delivery: MaildirDelivery) -> None:
    names = {delivery.deliver("b@a.mssante.test", MESSAGE) for _ in range(50)}
    assert len(names) == 50
    assert len(list((delivery.mailbox_path("b@a.mssante.test") / "new").iterdir())) == 50


def test_flags_put_the_message_in_cur(delivery: MaildirDelivery) -> None:
    name = delivery.deliver("b@a.mssante.test", MESSAGE, folder="Sent", flags="SR")
    assert name.endswith(":2,RS")
    assert (delivery.mailbox_path("b@a.mssante.test") / ".Sent" / "cur" / name).read_bytes() == MESSAGE


def test_bad_flags_and_missing_folder(delivery: MaildirDelivery) -> None:
    with pytest.raises(DeliveryError, match="flag"):
        delivery.deliver("b@a.mssante.test", MESSAGE, flags="X")
    with pytest.raises(DeliveryError, match="no folder"):
        delivery.deliver("b@a.mssante.test", MESSAGE, folder="Archives")


def test_disk_problem_is_a_delivery_error(delivery: MaildirDelivery) -> None:
    delivery.ensure_folders("b@a.mssante.test")
    tmp = delivery.mailbox_path("b@a.mssante.test") / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # tmp/ unusable: the write cannot start
    with pytest.raises(DeliveryError, match=r"cannot deliver to b@a\.mssante\.test \(INBOX\)"):
        delivery.deliver("b@a.mssante.test", MESSAGE)


def test_rename_failure_leaves_nothing_in_tmp(delivery: MaildirDelivery) -> None:
    delivery.ensure_folders("b@a.mssante.test")
    base = delivery.mailbox_path("b@a.mssante.test")
    (base / "new").rmdir()
    (base / "new").write_bytes(b"")  # a file where the new/ directory should be
    with pytest.raises(DeliveryError):
        delivery.deliver("b@a.mssante.test", MESSAGE)
    assert list((base / "tmp").iterdir()) == []
