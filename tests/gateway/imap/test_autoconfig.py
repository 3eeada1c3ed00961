"""Autoconfig document and SRV records."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from directory.identifiers import InvalidIdentifier
from gateway.config import validate
from gateway.imap.autoconfig import autoconfig_xml, service_ports, srv_records


def test_thunderbird_document(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ports = service_ports(validate({}, tmp_path, environ={}))
    root = ET.fromstring(autoconfig_xml("A.MSSante.test", "mail.a.mssante.test", ports))  # noqa: S314
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    incoming = [(s.findtext("port"), s.findtext("socketType")) for s in root.iter("incomingServer")]
    outgoing = [(s.findtext("port"), s.findtext("socketType")) for s in root.iter("outgoingServer")]
    assert incoming == [("1993", "SSL"), ("1143", "STARTTLS")]
    assert outgoing == [("1465", "SSL"), ("1587", "STARTTLS")]
    assert {s.findtext("username") for s in root.iter() if s.tag.endswith("Server")} == {"%EMAILADDRESS%"}
    assert root.find("emailProvider/domain").text == "a.mssante.test"  # type: ignore[union-attr]


def test_srv_records() -> None:
    text = srv_records("a.mssante.test", "mail.a.mssante.test", {"imaps": 993, "imap": 143, "submissions": 465,
                                                                  "submission": 587})
    assert "_imaps._tcp.a.mssante.test. 3600 IN SRV 0 1 993 mail.a.mssante.test." in text
    assert "_submission._tcp.a.mssante.test. 3600 IN SRV 10 1 587 mail.a.mssante.test." in text
    assert "_pop3._tcp.a.mssante.test. 3600 IN SRV 0 1 0 ." in text


def test_bad_domain() -> None:
    with pytest.raises(InvalidIdentifier):
        autoconfig_xml("not a domain", "h", {"imaps": 1, "imap": 2, "submissions": 3, "submission": 4})
