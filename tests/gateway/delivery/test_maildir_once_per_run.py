"""Local delivery once per message even when a run dies between the Maildir write and its outcome.

A claimed run (``DELIVERY_RUN`` says so) looks for the copy an earlier run of the same queue id
wrote to the same mailbox folder and keeps it instead of writing a second; a run that was
handed the message at acceptance (not claimed) never scans.  Real files, real folders.
"""

from __future__ import annotations

from pathlib import Path

from gateway.delivery.maildir import DELIVERY_RUN, MaildirDelivery

BOX = "ward@a.mssante.test"


def _files(local: MaildirDelivery, folder: str = "INBOX") -> list[Path]:
    base = local.folder_path(BOX, folder)
    return sorted([*base.glob("new/*"), *base.glob("cur/*")])


def test_a_claimed_run_keeps_the_copy_a_dead_run_wrote(tmp_path: Path) -> None:
    local = MaildirDelivery(tmp_path / "mail")
    token = DELIVERY_RUN.set(("q" * 32, False))  # the first run: handed over at acceptance
    try:
        first = local.deliver(BOX, b"Subject: x\r\n\r\none\r\n")
    finally:
        DELIVERY_RUN.reset(token)
    # The run died before its outcome committed; another node claims the message and redoes it.
    token = DELIVERY_RUN.set(("q" * 32, True))
    try:
        again = local.deliver(BOX, b"Subject: x\r\n\r\none\r\n")
        sent = local.deliver(BOX, b"Subject: x\r\n\r\none\r\n", folder="Sent", flags="S")  # another folder
    finally:
        DELIVERY_RUN.reset(token)
    assert again == first and [p.name for p in _files(local)] == [first]
    assert [p.name for p in _files(local, "Sent")] == [sent]


def test_a_copy_moved_to_cur_by_an_imap_client_is_still_found(tmp_path: Path) -> None:
    local = MaildirDelivery(tmp_path / "mail")
    token = DELIVERY_RUN.set(("r" * 32, True))
    try:
        name = local.deliver(BOX, b"Subject: y\r\n\r\ntwo\r\n")
        base = local.folder_path(BOX, "INBOX")
        (base / "new" / name).rename(base / "cur" / f"{name}:2,S")  # read by the practitioner meanwhile
        assert local.deliver(BOX, b"Subject: y\r\n\r\ntwo\r\n") == f"{name}:2,S"
    finally:
        DELIVERY_RUN.reset(token)
    assert len(_files(local)) == 1


def test_other_messages_and_runs_outside_the_queue_are_not_merged(tmp_path: Path) -> None:
    local = MaildirDelivery(tmp_path / "mail")
    local.deliver(BOX, b"Subject: a\r\n\r\n1\r\n")  # no run (an IMAP APPEND, a test): plain names
    local.deliver(BOX, b"Subject: a\r\n\r\n1\r\n")
    for queue_id in ("s" * 32, "t" * 32):
        token = DELIVERY_RUN.set((queue_id, True))
        try:
            local.deliver(BOX, b"Subject: a\r\n\r\n1\r\n")
        finally:
            DELIVERY_RUN.reset(token)
    assert len(_files(local)) == 4
