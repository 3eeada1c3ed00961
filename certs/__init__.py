"""Development PKI for mssgw (see `certs.pki`) and the guide to bringing real IGC-Santé certificates."""

from __future__ import annotations
