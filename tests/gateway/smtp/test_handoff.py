"""Hand-off: a message accepted over SMTP goes to this process's workers from memory, no claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smtp_world import DOMAIN, PeerCerts, World, message

from gateway.app import Gateway
from gateway.config import load_settings
from gateway.delivery.maildir import MaildirDelivery


async def test_accepted_message_is_processed_without_a_claim(gateway_home: Path, peer_certs: PeerCerts) -> None:
    settings = load_settings(gateway_home)
    gateway = Gateway(settings, workers=True, imap=False)
    await gateway.start()
    claimed: list[str] = []
    try:
        store = gateway.workers.store
        claim_rows = store.claim_rows

        def counting(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            rows = claim_rows(*args, **kwargs)
            claimed.extend(row["id"] for row in rows)
            return rows

        store.claim_rows = counting
        world = World(gateway_home, settings, gateway, peer_certs)
        smtp = await world.submitter()
        await smtp.sendmail(f"sec@{DOMAIN}", [f"bob@{DOMAIN}"], message(message_id="<handoff@a.mssante.test>"))
        await smtp.quit()
    finally:
        await gateway.stop()  # waits for the message in the workers' hands
    assert gateway.store is not None
    [row] = gateway.store.list(include_done=True)
    assert row["state"] == "done" and row["id"] not in claimed
    inbox = MaildirDelivery(settings.mail_dir).folder_path(f"bob@{DOMAIN}", "INBOX") / "new"
    [delivered] = list(inbox.iterdir())
    assert b"<handoff@a.mssante.test>" in delivered.read_bytes()
