"""Private keys parsed once per distinct bytes in a process.

Why: cryptography checks an RSA private key as it loads it (OpenSSL's ``RSA_check_key``, about
130 ms for one of our 3072-bit keys), and the same key is loaded again and again: ``mssgw init``
read the development CA's and the operator's key files five times (0.67 s of its 0.94 s), and
every command and worker process opens the sealed operator key anew.  The check stays, since it
is what stops a corrupted or crafted key before it signs anything, but it is done once for given
bytes; key objects are immutable and may be shared between threads.

Only unencrypted PEM or DER keys come here; a key under a passphrase (``certs import``) is
loaded where it is read.
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = ["private_key_from_der", "private_key_from_pem"]

_KEYS_KEPT = 64


@functools.lru_cache(maxsize=_KEYS_KEPT)
def private_key_from_pem(data: bytes) -> PrivateKeyTypes:
    """``load_pem_private_key(data, password=None)``, checked once per distinct ``data``."""
    return serialization.load_pem_private_key(data, password=None)


@functools.lru_cache(maxsize=_KEYS_KEPT)
def private_key_from_der(data: bytes) -> PrivateKeyTypes:
    """``load_der_private_key(data, password=None)``, checked once per distinct ``data``."""
    return serialization.load_der_private_key(data, password=None)
