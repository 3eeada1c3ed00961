"""Message security for mssgw: S/MIME (smime, cms), X.509 trust (trust), OpenPGP (openpgp), verdicts (result)."""

from __future__ import annotations

from gateway.crypto.result import SecurityResult

__all__ = ["SecurityResult"]
