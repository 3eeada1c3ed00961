"""A private Postfix instance that plays a peer operator on loopback, for the interoperability tests.

Postfix (the Debian package, installed by ``scripts/install-system-deps`` with debconf's "No
configuration") runs with its own ``config_directory``, ``queue_directory`` and
``data_directory``, on a random loopback port, never touching ``/etc/postfix`` or port 25:

- its SMTP server requires TLS and a client certificate that chains to the peer's CA
  (``smtpd_tls_security_level = encrypt``, ``smtpd_tls_req_ccert = yes``, ``smtpd_tls_CAfile``);
- its virtual(8) delivery agent writes Maildirs for the listed mailboxes; an unlisted one is
  refused at RCPT time (550 5.1.1), and one mailbox is routed to a pipe(8) command that fails
  permanently (EX_CANTCREAT), so Postfix accepts mail for it and then bounces it itself;
- its SMTP client relays our domain's mail (its bounces) to our inbound listener, presenting its
  certificate and verifying ours (``smtp_tls_policy_maps``: ``secure match=<our host name>``).

The instance lives in a folder of its own under ``/tmp`` (mode 0755), not in pytest's
``tmp_path``: Postfix's daemons drop to the ``postfix`` user, which cannot traverse pytest's 0700
base folder. ``stop`` stops the master it started (by its pid) and removes the folder.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
FULL_EXIT = 73  # EX_CANTCREAT: Postfix bounces with 5.2.0 and the command's output

# Our own master.cf: no chroot (the instance folder is not a chroot jail), one inet listener.
_MASTER = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
full      unix  -       n       n       -       -       pipe
  flags=q user=nobody argv=/bin/sh {full_script}
"""


def _postfix_argv(*argv: str) -> list[str]:
    """Run a Postfix command with umask 022: the gateway's private umask (0077) is inherited by
    children, and Postfix's queue folders must stay reachable by its unprivileged daemons."""
    return ["/bin/sh", "-c", 'umask 022 && exec "$@"', "postfix-command", *argv]


@dataclass
class PostfixPeer:
    """One running private Postfix; ``mailbox`` reads what its virtual(8) agent delivered."""

    root: Path
    domain: str
    hostname: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log_tail(self, lines: int = 40) -> str:
        """The end of Postfix's log, for assertion messages (it holds envelope addresses only)."""
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def mailbox(self, local_part: str) -> list[bytes]:
        """The messages delivered to ``local_part`` (Maildir ``new/`` and ``cur/``), oldest first."""
        base = self.root / "vmail" / local_part
        files = sorted([*base.glob("new/*"), *base.glob("cur/*")], key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]

    def postconf(self, *settings: str) -> None:
        subprocess.run(_postfix_argv(POSTCONF, "-c", str(self.config_dir), "-e", *settings), check=True,
                       capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        """Start the master in the foreground (``start-fg``) and wait until it accepts connections."""
        done = subprocess.run(_postfix_argv(POSTFIX, "-c", str(self.config_dir), "check"), capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"postfix check failed:\n{done.stdout}{done.stderr}")
        log = (self.root / "master.out").open("ab")
        self.process = subprocess.Popen(_postfix_argv(POSTFIX, "-c", str(self.config_dir), "start-fg"), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        log.close()

    def stop(self) -> None:
        """Stop the master this object started (``postfix stop``, then its pid), remove the folder."""
        if self.process is not None and self.process.poll() is None:
            subprocess.run(_postfix_argv(POSTFIX, "-c", str(self.config_dir), "stop"), capture_output=True, timeout=60,
                           check=False)  # fmt: skip
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a configuration file readable by Postfix's daemons (our umask would make it 0600)."""
    path.write_text(text)
    os.chmod(path, mode)


def make_postfix_peer(*, domain: str, hostname: str, port: int, cert: Path, key: Path, peer_ca: Path,
                      peer_domain: str, peer_hostname: str, peer_port: int,
                      mailboxes: list[str], full_mailbox: str) -> PostfixPeer:  # fmt: skip
    """Write a private instance's configuration (not started).

    ``cert``/``key``: Postfix's certificate, used as server and as client; ``peer_ca``: the CA its
    server requires client certificates from and its client verifies the peer's server with;
    mail for ``peer_domain`` goes to ``127.0.0.1:peer_port`` whose certificate must name
    ``peer_hostname``.  ``mailboxes`` are local parts delivered to Maildirs; ``full_mailbox`` is
    accepted and then bounced by its delivery command.
    """
    root = Path(tempfile.mkdtemp(prefix="mssgw-postfix-", dir="/tmp"))
    os.chmod(root, 0o755)  # noqa: S103  (Postfix's daemons run as the postfix user: they must traverse it)
    peer = PostfixPeer(root, domain, hostname, port)
    etc, queue, data, vmail = peer.config_dir, root / "queue", root / "data", root / "vmail"
    for d in (etc, queue, data, vmail):
        d.mkdir()
        os.chmod(d, 0o755)  # noqa: S103  (the same: queue, data and mailboxes reached by postfix)
    owner = pwd.getpwnam("postfix")
    for d in (data, vmail):
        os.chown(d, owner.pw_uid, owner.pw_gid)
    tls = root / "tls"
    tls.mkdir(mode=0o700)
    shutil.copy(cert, tls / "cert.pem")
    shutil.copy(key, tls / "key.pem")
    shutil.copy(peer_ca, tls / "peer-ca.pem")
    full_script = root / "full.sh"
    _write(full_script, f"echo 'mailbox full'\nexit {FULL_EXIT}\n", 0o755)
    _write(etc / "master.cf", _MASTER.format(listen=f"127.0.0.1:{port}", full_script=full_script))
    _write(etc / "main.cf", "")
    _write(etc / "vmailbox", "".join(f"{box}@{domain} {box}/\n" for box in [*mailboxes, full_mailbox]))
    _write(etc / "transport", f"{peer_domain} smtp:[127.0.0.1]:{peer_port}\n{full_mailbox}@{domain} full:\n")
    _write(etc / "tls_policy", f"[127.0.0.1]:{peer_port} secure match={peer_hostname}\n")
    peer.postconf(
        "compatibility_level=3.6",
        f"queue_directory={queue}",
        f"data_directory={data}",
        "mail_owner=postfix",
        "setgid_group=postdrop",
        f"maillog_file_prefixes={root}",
        f"maillog_file={peer.maillog}",
        f"myhostname={hostname}",
        f"mydomain={domain}",
        "myorigin=$myhostname",
        "mydestination=",
        "inet_interfaces=127.0.0.1",
        "inet_protocols=ipv4",
        "mynetworks=127.0.0.1/32",
        "alias_maps=",
        "alias_database=",
        "local_recipient_maps=",
        "biff=no",
        "smtp_dns_support_level=disabled",
        "smtp_host_lookup=native",
        f"virtual_mailbox_domains={domain}",
        f"virtual_mailbox_maps=texthash:{etc / 'vmailbox'}",
        f"virtual_mailbox_base={vmail}",
        f"virtual_uid_maps=static:{owner.pw_uid}",
        f"virtual_gid_maps=static:{owner.pw_gid}",
        f"virtual_minimum_uid={min(owner.pw_uid, 100)}",
        f"transport_maps=texthash:{etc / 'transport'}",
        "full_destination_recipient_limit=1",
        # The server: TLS required, with a client certificate from the peer's CA.
        f"smtpd_tls_cert_file={tls / 'cert.pem'}",
        f"smtpd_tls_key_file={tls / 'key.pem'}",
        f"smtpd_tls_CAfile={tls / 'peer-ca.pem'}",
        "smtpd_tls_security_level=encrypt",
        "smtpd_tls_ask_ccert=yes",
        "smtpd_tls_req_ccert=yes",
        "smtpd_tls_received_header=yes",
        "smtpd_tls_loglevel=1",
        # The client: our certificate, the peer's server verified against its CA and host name.
        f"smtp_tls_cert_file={tls / 'cert.pem'}",
        f"smtp_tls_key_file={tls / 'key.pem'}",
        f"smtp_tls_CAfile={tls / 'peer-ca.pem'}",
        "smtp_tls_security_level=secure",
        f"smtp_tls_policy_maps=texthash:{etc / 'tls_policy'}",
        "smtp_tls_loglevel=1",
        "delay_warning_time=0",
    )
    return peer


async def until(predicate: Callable[[], bool], what: str, *, timeout: float = 60.0,
                step: Callable[[], object] | None = None, detail: Callable[[], str] = lambda: "") -> None:  # fmt: skip
    """Poll ``predicate`` (a file, a queue row: the event is in another process) until it holds.

    ``step`` (an awaitable-returning callable, e.g. a worker's ``run_once``) runs before each look.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        if step is not None:
            result = step()
            if asyncio.iscoroutine(result):
                await result
        if predicate():
            return
        if loop.time() > end:
            raise TimeoutError(f"{what}\n{detail()}")
        await asyncio.sleep(0.05)
