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

from client_world import ALICE, BOB, PASSWORD, World

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
# the Message-ID's domain: without it neomutt asks DNS for this machine's name (10 s per run
# where the name resolves nowhere and DNS does not answer)
set hostname="a.mssante.test"
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


def imap_state(world: World, address: str, folder: str) -> list[tuple[bytes, str]]:
    """(bytes, Maildir info letters) of each message the server holds in ``folder``."""
    base = world.maildir.folder_path(address, folder)
    out = []
    for path in sorted([*base.glob("new/*"), *base.glob("cur/*")]):
        out.append((path.read_bytes(), path.name.partition(":2,")[2]))
    return out


def local_files(root: Path, folder: str) -> list[Path]:
    return sorted([*(root / folder).glob("new/*"), *(root / folder).glob("cur/*")])


async def test_mbsync_syncs_every_folder_twice_with_a_local_change_in_between(world: World) -> None:
    for n in range(2):  # two messages waiting in the INBOX, one Draft
        world.maildir.deliver(ALICE, f"From: {BOB}\r\nTo: {ALICE}\r\nSubject: labo {n}\r\n\r\nresultat {n}\r\n".encode())
    world.maildir.deliver(ALICE, b"From: x@a.mssante.test\r\nSubject: brouillon\r\n\r\n...\r\n", folder="Drafts", flags="D")
    root = local_maildir(world)
    first = await mbsync(world)  # over IMAPS
    assert {p.name for p in root.iterdir()} >= {"INBOX", "Sent", "Drafts", "Trash", "Junk"}, first
    inbox = local_files(root, "INBOX")
    assert len(inbox) == 2 and len(local_files(root, "Drafts")) == 1
    # the clinician reads one message (flag S) and deletes the other (moved to Trash by the client:
    # here the local file goes and a copy is put in the local Trash), then files a local draft
    read, deleted = inbox
    read.rename(read.parent.parent / "cur" / (read.name.partition(":2,")[0] + ":2,S"))
    (root / "Trash" / "new" / "2.local.trash").write_bytes(deleted.read_bytes())  # a new file: no U= of mbsync's
    deleted.unlink()
    (root / "Drafts" / "new" / "1.local.draft").write_bytes(b"From: " + ALICE.encode() + b"\r\nSubject: suite\r\n\r\nA suivre.\r\n")
    await mbsync(world, starttls=True)  # the second run over the STARTTLS port, same sync state
    server_inbox = imap_state(world, ALICE, "INBOX")
    assert len(server_inbox) == 1 and "S" in server_inbox[0][1] and b"labo 0" in server_inbox[0][0]
    assert [b"labo 1" in raw for raw, _ in imap_state(world, ALICE, "Trash")] == [True]
    drafts = sorted(raw.split(b"Subject: ")[1].split(b"\r\n")[0] for raw, _ in imap_state(world, ALICE, "Drafts"))
    assert drafts == [b"brouillon", b"suite"]
    # a third run has nothing left to do and still exits 0
    await mbsync(world)
    assert len(local_files(root, "INBOX")) == 1 and len(imap_state(world, ALICE, "INBOX")) == 1


async def test_fetchmail_fetches_with_sslcertck_over_both_imap_ports(world: World) -> None:
    world.maildir.deliver(BOB, f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: ordonnance\r\n\r\nTexte.\r\n".encode())
    out = world.tmp / "fetched.mbox"
    for port, tls in ((world.port("imaps"), "ssl"), (world.port("imap"), "sslproto tls1.2+")):
        rc = private(world.tmp / "fetchmailrc", f"""
poll localhost service {port} protocol IMAP auth password
  user "{BOB}" password "{PASSWORD}" is "{BOB}"
  {tls} sslcertck sslcertfile "{world.ca}"
  keep fetchall
  mda "/usr/bin/tee -a {out}"
""")
        proc = await world.run(["fetchmail", "--nosyslog", "--nodetach", "-f", str(rc)], env=client_env(world))
        output = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode == 0, output
        assert "1 message for" in output, output
    assert out.read_bytes().count(b"Subject: ordonnance") == 2


async def test_fetchmail_refuses_a_server_it_cannot_verify(world: World) -> None:
    """sslcertck is on: without our CA the client must not log in (the certificate is checked)."""
    other_ca = world.tmp / "other-ca.pem"
    other_ca.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    rc = private(world.tmp / "fetchmailrc-untrusted", f"""
poll localhost service {world.port('imaps')} protocol IMAP auth password
  user "{BOB}" password "{PASSWORD}"
  ssl sslcertck sslcertfile "{other_ca}"
  keep mda "/bin/true"
""")
    proc = await world.run(["fetchmail", "--nosyslog", "--nodetach", "-f", str(rc)], env=client_env(world))
    assert proc.returncode not in (0, 1), (proc.stdout + proc.stderr).decode(errors="replace")  # 1 = no mail


async def test_curl_reads_over_both_imap_ports_and_lists_special_use(world: World) -> None:
    message = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: curl\r\n\r\nLu par curl.\r\n".encode()
    world.maildir.deliver(BOB, message)
    user = f"{BOB}:{PASSWORD}"
    for url in (f"imaps://localhost:{world.port('imaps')}", f"imap://localhost:{world.port('imap')}"):
        common = ["curl", "--silent", "--show-error", "--cacert", str(world.ca), "--ssl-reqd", "--user", user]
        fetched = await world.run([*common, f"{url}/INBOX;UID=1"], env=client_env(world))
        assert fetched.returncode == 0, fetched.stderr.decode(errors="replace")
        assert fetched.stdout.replace(b"\r\n", b"\n") == message.replace(b"\r\n", b"\n")
        listed = await world.run([*common, url + "/"], env=client_env(world))
        assert listed.returncode == 0, listed.stderr.decode(errors="replace")
        lines = listed.stdout.decode().splitlines()
        for folder, flag in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"), ("Junk", "\\Junk")):
            (line,) = [x for x in lines if x.rstrip().endswith(f" {folder}") or x.rstrip().endswith(f'"{folder}"')]
            assert flag in line, line


async def test_getmail_retrieves_and_knows_who_sent_it(world: World) -> None:
    """getmail showed ``<unknown>`` as the sender before delivery wrote Return-Path."""
    attachment = world.tmp / "cr.pdf"
    attachment.write_bytes(PDF)
    user = ALICE.replace("@", "%40")
    await neomutt_send(world, f"smtps://{user}@localhost:{world.port('submissions')}/", "CR getmail", attachment)
    await world.delivered(BOB, 1)
    dest = world.tmp / "getmail-maildir"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True)
    rc = private(world.tmp / "getmailrc", f"""
[retriever]
type = SimpleIMAPSSLRetriever
server = localhost
port = {world.port('imaps')}
username = {BOB}
password = {PASSWORD}
ca_certs = {world.ca}
mailboxes = ("INBOX",)

[destination]
type = MDA_external
path = /bin/sh
arguments = ("-c", "cat > {dest}/new/fetched")
allow_root_commands = true

[options]
read_all = true
delete = false
verbose = 2
""")
    proc = await world.run(["getmail", "--rcfile", str(rc), "--getmaildir", str(world.tmp)], env=client_env(world))
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, output
    assert f"from <{ALICE}>" in output and "<unknown>" not in output, output
    (got,) = [p.read_bytes() for p in (dest / "new").iterdir()]
    msg = parse(got)
    assert msg["Subject"] == "CR getmail" and len(msg.get_all("Return-Path")) == 1
