"""Private keys parsed once per distinct bytes (``gateway.core.keys``), still checked the first time."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.keys import private_key_from_der, private_key_from_pem

_PEM = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
_DER = serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()


def test_the_same_bytes_give_the_same_key_without_a_second_parse() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem, der = key.private_bytes(*_PEM), key.private_bytes(*_DER)
    first = private_key_from_pem(pem)
    assert private_key_from_pem(pem) is first
    assert private_key_from_der(der) is private_key_from_der(der)
    assert first.private_numbers() == key.private_numbers()


def test_a_crafted_rsa_key_is_still_refused_every_time() -> None:
    """The check cryptography makes on load (a wrong CRT exponent lets a signature leak the key)
    is kept; and a refusal is never remembered as a key."""
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    bad_numbers = rsa.RSAPrivateNumbers(good.p, good.q, good.d, good.dmp1 ^ 2, good.dmq1, good.iqmp,
                                        good.public_numbers)  # fmt: skip
    bad = bad_numbers.private_key(unsafe_skip_rsa_key_validation=True)
    for data, load in ((bad.private_bytes(*_PEM), private_key_from_pem), (bad.private_bytes(*_DER), private_key_from_der)):
        for _ in range(2):
            with pytest.raises(ValueError):
                load(data)
