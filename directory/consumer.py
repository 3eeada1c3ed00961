"""The seeded blocklist of consumer mail providers.

Health data may not travel through consumer mailboxes. Anything outside the
trust space is refused anyway; this list only lets the refusal say *why* in
words a clinician understands. A pattern ending in ``.*`` matches the name under
any public suffix (``yahoo.*`` matches ``yahoo.fr`` and ``yahoo.co.uk``).
"""

from __future__ import annotations

CONSUMER_PROVIDERS: tuple[str, ...] = (
    "gmail.com", "googlemail.com", "yahoo.*", "ymail.com", "rocketmail.com",
    "hotmail.*", "outlook.*", "live.*", "msn.com", "passport.com",
    "icloud.com", "me.com", "mac.com", "aol.*", "aim.com",
    "gmx.*", "web.de", "mail.com", "yandex.*", "mail.ru", "zoho.com", "zohomail.eu",
    "orange.fr", "wanadoo.fr", "free.fr", "sfr.fr", "neuf.fr", "cegetel.net", "club-internet.fr",
    "bbox.fr", "numericable.fr", "noos.fr", "laposte.net", "aliceadsl.fr", "voila.fr",
    "protonmail.*", "proton.me", "pm.me", "tutanota.*", "tuta.io", "fastmail.*",
    "qq.com", "163.com", "126.com",
)


def matches(pattern: str, domain: str) -> bool:
    """Whether ``domain`` (or a parent of it) is named by ``pattern``."""
    domain = domain.lower().rstrip(".")
    if pattern.endswith(".*"):
        stem = pattern[:-2]
        labels = domain.split(".")
        # the stem followed by one or two suffix labels: yahoo.fr, yahoo.co.uk, mail.yahoo.fr
        for i in range(len(labels)):
            rest = labels[i:]
            if ".".join(rest[:1]) == stem and 2 <= len(rest) <= 3:
                return True
        return False
    return domain == pattern or domain.endswith("." + pattern)


def consumer_pattern_for(domain: str) -> str | None:
    for pattern in CONSUMER_PROVIDERS:
        if matches(pattern, domain):
            return pattern
    return None
