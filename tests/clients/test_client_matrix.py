"""Real, unmodified mail clients against a running gateway, certificate verification on.

neomutt (batch mode) sends with an attachment over both submission ports and saves its own Sent
copy over IMAPS; mbsync syncs every folder twice with a local change in between; fetchmail fetches
with ``sslcertck``; curl reads over both IMAP ports and lists the special-use folders; getmail6
retrieves over IMAPS and sees who sent the message. What lands is read back as a clinician's
client shows it: the original message, one Authentication-Results, the banner, the trace.
"""

from __future__ import annotations

import asyncio
import email.policy
import os
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

from conftest import ALICE, BOB, PASSWORD, World

PDF = b"%PDF-1.4\n% compte rendu\n" + bytes(range(256)) * 16 + b"\n%%EOF\n"
BANNER = "[Signé par Dr Anne Martin (RPPS 10000000009) : certificat valide, envoyé au sein de cet opérateur]"


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def private(path: Path, text: str) -> Path:
    """Client configuration holding a password: 0600, as fetchmail and getmail insist."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def client_env(world: World) -> dict[str, str]:
    """A clean HOME (no user configuration read), the system PATH and a UTF-8 locale."""
    home = world.tmp / "client-home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "TERM": "dumb"}  # fmt: skip


def local_maildir(world: World) -> Path:
    """The clinician's local mail (neomutt's record, mbsync's near side), Maildir++ folders."""
    root = world.tmp / "mail"
    for folder in ("INBOX", "Sent"):
        for sub in ("cur", "new", "tmp"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
    return root


def mbsyncrc(world: World, *, starttls: bool = False) -> Path:
    port, ssl_type = (world.port("imap"), "STARTTLS") if starttls else (world.port("imaps"), "IMAPS")
    root = local_maildir(world)
    return private(world.tmp / "mbsyncrc", f"""
IMAPAccount gateway
Host localhost
Port {port}
User {ALICE}
Pass "{PASSWORD}"
SSLType {ssl_type}
CertificateFile {world.ca}

IMAPStore gateway-far
Account gateway

MaildirStore local-near
Path {root}/
Inbox {root}/INBOX
SubFolders Verbatim

Channel gateway
Far :gateway-far:
Near :local-near:
Patterns *
Create Both
Expunge Both
SyncState *
""")


async def mbsync(world: World, *, starttls: bool = False) -> str:
    proc = await world.run(["mbsync", "-c", str(mbsyncrc(world, starttls=starttls)), "-a"], env=client_env(world))
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, output
    return output


def muttrc(world: World, smtp_url: str) -> Path:
    user = ALICE.replace("@", "%40")
    imaps = f"imaps://{user}@localhost:{world.port('imaps')}"
    return private(world.tmp / "muttrc", f"""
set from="Anne Martin <{ALICE}>"
set use_from=yes
set smtp_url="{smtp_url}"
set smtp_pass="{PASSWORD}"
set imap_pass="{PASSWORD}"
set ssl_force_tls=yes
set ssl_starttls=yes
set ssl_verify_host=yes
set ssl_verify_dates=yes
set ssl_ca_certificates_file="{world.ca}"
set certificate_file="{world.tmp / 'mutt-certificates'}"
set folder="{imaps}/"
set mbox_type=Maildir
set record="{local_maildir(world) / 'Sent'}"
set copy=yes
set send_charset="utf-8"
set header_cache=""
set message_cachedir=""
""")


async def neomutt_send(world: World, smtp_url: str, subject: str, attachment: Path) -> None:
    body = f"Bonjour,\nvoici le compte rendu ({subject}).\n".encode()
    proc = await world.run(["neomutt", "-n", "-F", str(muttrc(world, smtp_url)), "-s", subject, "-a", str(attachment),
                            "--", BOB], stdin=body, env=client_env(world))  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")


async def test_neomutt_sends_with_an_attachment_over_both_submission_ports(world: World) -> None:
    attachment = world.tmp / "compte-rendu.pdf"
    attachment.write_bytes(PDF)
    user = ALICE.replace("@", "%40")
    await neomutt_send(world, f"smtp://{user}@localhost:{world.port('submission')}/", "CR 587", attachment)
    await neomutt_send(world, f"smtps://{user}@localhost:{world.port('submissions')}/", "CR 465", attachment)
    inbox = await world.delivered(BOB, 2)
    workers = world.gateway.workers
    await asyncio.gather(*list(workers._inflight))  # each job has finished, Sent-copy decision included

    subjects = set()
    for raw in inbox:
        msg = parse(raw)
        subjects.add(msg["Subject"])
        assert msg.get_content_type() == "multipart/mixed" and not msg.defects
        # one trust indicator: one Authentication-Results (ours), one banner naming the signer
        results = msg.get_all("Authentication-Results")
        assert len(results) == 1 and "smime=pass" in str(results[0]), results
        parts = list(msg.iter_parts())
        assert parts[0].get_content().strip() == BANNER
        assert raw.count(BANNER.encode()) == 1 and b"CN=localhost" not in raw
        # the attachment is the client's, byte for byte, not inside a wrapped message
        (pdf,) = [p for p in msg.iter_attachments() if p.get_filename() == "compte-rendu.pdf"]
        assert pdf.get_content() == PDF
        # RFC 5321 4.4 trace: who sent it, and the submission hop
        assert msg["Return-Path"] == f"<{ALICE}>" and raw.startswith(f"Return-Path: <{ALICE}>\r\n".encode())
        received = msg.get_all("Received")
        assert len(received) == 1 and "by localhost (mssgw) with ESMTPSA" in " ".join(str(received[0]).split())
    assert subjects == {"CR 587", "CR 465"}
    # The gateway filed no Sent copy (a PER mailbox: its client keeps one). neomutt saved its own
    # (local Maildir: it does no IMAP Fcc in batch mode) and mbsync puts them on the server: one each.
    assert world.folder(ALICE, "Sent") == []
    await mbsync(world)
    sent = world.folder(ALICE, "Sent")
    assert sorted(parse(m)["Subject"] for m in sent) == ["CR 465", "CR 587"]
