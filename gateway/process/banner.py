"""The banner a clinician reads first: who signed, what was checked, in their language (fr/en).

Pure functions over the verification result (no directory, no I/O): the caller passes the signer
as the directory knows them. What the banner promises is what was checked, nothing more:

* the signer is named as the directory knows them ("Dr Anne Martin (RPPS 10000000009)"), or
  "unknown signer <address>" with the certificate's organisation, or the operator of the sending
  domain for a domain-bound certificate; a raw DN (``CN=localhost``) is never shown;
* "certificate valid" only when revocation was checked against a current CRL; otherwise
  "revocation not checked" (the CRL was unavailable or out of date, ``crypto.crl_soft_fail``);
  an OpenPGP signature says what was checked for it: a key the directory holds for the sender;
* a message delivered although a check failed (an unsigned message accepted by policy, a
  message an administrator released from quarantine) says in words what failed and what it means;
* how it travelled: encrypted between operators, signed over authenticated TLS, or within this
  operator.

The text is one or two short lines, in ``crypto.banner_language`` (``fr`` by default: the
clinicians of the French trust space; ``en``). ``gateway.process.inbound.annotate`` puts it in
a part every mail client shows.

Errors: ``ValueError`` for a language other than ``fr``/``en`` (the configuration refuses it first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from gateway.crypto.result import SecurityResult

__all__ = ["LANGUAGES", "Transit", "banner_text", "failure_words", "signer_name"]

Language = Literal["fr", "en"]
#: How the message reached us: from a peer encrypted or signed over mutual TLS, or from one of ours.
Transit = Literal["peer", "local"]
LANGUAGES: tuple[str, ...] = ("fr", "en")

_WORDS: dict[str, dict[str, str]] = {
    "signed-by": {"fr": "Signé par {who}", "en": "Signed by {who}"},
    "valid": {"fr": "certificat valide", "en": "certificate valid"},
    # OpenPGP has no certificate or CRL here: what was checked is that the signing key is one the
    # directory holds for the sender (imported by an administrator), not revoked there.
    "pgp-key": {"fr": "clé OpenPGP enregistrée dans l'annuaire", "en": "OpenPGP key registered in the directory"},
    "no-revocation": {
        "fr": "signature vérifiée, révocation non vérifiée (liste de révocation indisponible)",
        "en": "signature verified, revocation not checked (revocation list unavailable)",
    },
    "stale-revocation": {
        "fr": "signature vérifiée, révocation non vérifiée (liste de révocation périmée)",
        "en": "signature verified, revocation not checked (revocation list out of date)",
    },
    "encrypted": {"fr": "chiffré pendant le transport", "en": "encrypted in transit"},
    "tls": {"fr": "transmis entre opérateurs par TLS authentifié", "en": "sent over authenticated TLS between operators"},
    "local": {"fr": "envoyé au sein de cet opérateur", "en": "sent within this operator"},
    "unknown-signer": {"fr": "signataire inconnu <{address}>", "en": "unknown signer <{address}>"},
    "unknown-signer-org": {
        "fr": "signataire inconnu <{address}>, certificat de {org}",
        "en": "unknown signer <{address}>, certificate of {org}",
    },
    "domain-operator": {
        "fr": "l'opérateur du domaine {domain}",
        "en": "the operator of {domain}",
    },
    "domain-operator-org": {
        "fr": "l'opérateur du domaine {domain} ({org})",
        "en": "the operator of {domain} ({org})",
    },
    "no-signer": {"fr": "signataire non identifié", "en": "unidentified signer"},
    "not-verified": {"fr": "NON VÉRIFIÉ : {why}.", "en": "NOT VERIFIED: {why}."},
    "caution": {
        "fr": "Vérifiez l'expéditeur par un autre moyen avant de vous fier au contenu.",
        "en": "Confirm the sender another way before relying on the content.",
    },
    "released": {
        "fr": "Remis par votre administrateur après mise en quarantaine.",
        "en": "Released by your administrator from quarantine.",
    },
}

#: Failure codes (``gateway.crypto.result.FAILURE_CODES``) said in words, per language.
_FAILURES: dict[str, dict[str, str]] = {
    "not-signed": {
        "fr": "le message n'est pas signé, son expéditeur ne peut pas être confirmé",
        "en": "the message is not signed, so its sender cannot be confirmed",
    },
    "tampered-content": {
        "fr": "le contenu a été modifié après la signature",
        "en": "the content was changed after it was signed",
    },
    "bad-signature": {
        "fr": "la signature ne correspond pas au contenu",
        "en": "the signature does not match the content",
    },
    "untrusted-ca": {
        "fr": "le certificat du signataire ne vient pas d'une autorité reconnue",
        "en": "the signer's certificate does not come from a recognised authority",
    },
    "expired": {"fr": "le certificat du signataire a expiré", "en": "the signer's certificate has expired"},
    "not-yet-valid": {
        "fr": "le certificat du signataire n'est pas encore valide",
        "en": "the signer's certificate is not valid yet",
    },
    "revoked": {"fr": "le certificat du signataire a été révoqué", "en": "the signer's certificate has been revoked"},
    "crl-unavailable": {
        "fr": "la révocation du certificat du signataire n'a pas pu être vérifiée",
        "en": "whether the signer's certificate was revoked could not be checked",
    },
    "crl-stale": {
        "fr": "la révocation du certificat du signataire n'a pas pu être vérifiée",
        "en": "whether the signer's certificate was revoked could not be checked",
    },
    "from-mismatch": {
        "fr": "le signataire n'est pas l'expéditeur affiché",
        "en": "the signer is not the sender shown in From",
    },
    "no-signer-certificate": {
        "fr": "le certificat du signataire manque",
        "en": "the signer's certificate is missing",
    },
    "unknown-key": {
        "fr": "la clé du signataire est inconnue",
        "en": "the signer's key is unknown",
    },
    "bad-key-usage": {
        "fr": "le certificat du signataire n'est pas fait pour signer des messages",
        "en": "the signer's certificate is not meant for signing messages",
    },
}
_FAILURE_DEFAULT = {
    "fr": "la vérification de sécurité a échoué",
    "en": "the security check failed",
}

_ORG = re.compile(r"(?:^|,)\s*O=((?:[^,\\]|\\.)+)")
_DN_LIKE = re.compile(r"(?:^|,)\s*(?:CN|O|OU|C|L|ST)=", re.IGNORECASE)


def _lang(language: str) -> Language:
    if language not in LANGUAGES:
        raise ValueError(f"banner language must be fr or en, got {language!r}")
    return "fr" if language == "fr" else "en"


def _organisation(subject: str | None) -> str | None:
    """The O= of an RFC 4514 subject, unescaped; None when absent."""
    if not subject:
        return None
    match = _ORG.search(subject)
    return re.sub(r"\\(.)", r"\1", match.group(1)).strip() if match else None


def _clean(text: str) -> str:
    """One printable line (labels come from the directory and certificates: no line breaks)."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def signer_name(result: SecurityResult, label: str | None, language: str) -> str:
    """The signer as a reader should see them (see the module docstring); never a raw DN."""
    lang = _lang(language)
    org = _organisation(result.signer_subject)
    if label and not _DN_LIKE.search(label):
        return _clean(label)
    if result.signer_email:
        key = "unknown-signer-org" if org else "unknown-signer"
        return _WORDS[key][lang].format(address=_clean(result.signer_email), org=_clean(org or ""))
    domain = (result.from_address or "").rpartition("@")[2]
    if domain:  # a domain-bound (operator) certificate vouching for its domain's From
        key = "domain-operator-org" if org else "domain-operator"
        return _WORDS[key][lang].format(domain=_clean(domain), org=_clean(org or ""))
    return _WORDS["no-signer"][lang]


def failure_words(failure: str | None, language: str) -> str:
    """What a failed check means, in a few words (no codes, no DNs)."""
    lang = _lang(language)
    return _FAILURES.get(failure or "", _FAILURE_DEFAULT)[lang]


@dataclass(frozen=True)
class _Facts:
    result: SecurityResult
    label: str | None
    transit: Transit
    released: bool


def banner_text(result: SecurityResult, *, label: str | None = None, language: str = "fr",
                transit: Transit = "peer", released: bool = False) -> str:  # fmt: skip
    """The banner: one line for a verified message, two for one delivered despite a failed check.

    ``label`` is the signer as the directory knows them (``directory.facts.signer_label``);
    ``transit`` says whether the message came from a peer operator or from one of our mailboxes;
    ``released`` that an administrator delivered it from quarantine."""
    lang = _lang(language)
    facts = _Facts(result, label, transit, released)
    if result.ok:
        return _verified(facts, lang)
    line = "[" + _WORDS["not-verified"][lang].format(why=failure_words(result.failure, lang)) + " "
    line += _WORDS["caution"][lang] + "]"
    return line + ("\r\n[" + _WORDS["released"][lang] + "]" if released else "")


def _verified(facts: _Facts, lang: Language) -> str:
    result = facts.result
    parts = [_WORDS["signed-by"][lang].format(who=signer_name(result, facts.label, lang))]
    if result.method == "pgp":
        parts.append(_WORDS["pgp-key"][lang])
    elif result.crl_status == "good":
        parts.append(_WORDS["valid"][lang])
    elif result.crl_status == "stale":
        parts.append(_WORDS["stale-revocation"][lang])
    else:
        parts.append(_WORDS["no-revocation"][lang])
    if facts.transit == "local":
        parts.append(_WORDS["local"][lang])
    else:
        parts.append(_WORDS["encrypted" if result.encrypted else "tls"][lang])
    separator = " : " if lang == "fr" else ": "
    return "[" + parts[0] + separator + ", ".join(parts[1:]) + "]"
