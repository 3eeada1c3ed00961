"""The INS checks: NIR format, key (Corsica included), authorities' OIDs; the number never printed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.documents.ins import (
    OID_DEMO,
    OID_REAL,
    OID_TEST,
    InsError,
    check_nir,
    nir_key,
    parse_cx,
    parse_ins,
    salted_hash,
)
from tests.gateway.documents.xdm_samples import NIR, corsica_nir


def test_valid_nir_and_its_key() -> None:
    assert check_nir(NIR) == NIR
    assert check_nir("2 79 03 51 215 189 89") == NIR  # spaces as printed on a card
    assert nir_key(NIR[:13]) == 89


@pytest.mark.parametrize("wrong", [NIR[:13] + "88", NIR[:13] + "98", NIR[:14], NIR + "1", "979035121518989", ""])
def test_wrong_key_or_shape_is_refused(wrong: str) -> None:
    with pytest.raises(InsError) as caught:
        check_nir(wrong)
    assert NIR[:13] not in str(caught.value)  # the reason never repeats the number


def test_corsica_departments_count_as_19_and_18() -> None:
    nir = corsica_nir()
    assert check_nir(nir.lower()) == nir  # 2a accepted, canonical 2A
    key = int(nir[-2:])
    assert key == 97 - int(nir[:13].replace("2A", "19")) % 97
    wrong = nir[:13] + f"{(key % 97) + 1:02d}"
    with pytest.raises(InsError):
        check_nir(wrong)
    b_first = nir[:5] + "2B" + nir[7:13]
    assert nir_key(b_first) == 97 - int(b_first.replace("2B", "18")) % 97


@pytest.mark.parametrize(("oid", "kind"), [(OID_REAL, "real"), (OID_TEST, "test"), (OID_DEMO, "demo"),
                                           ("1.2.250.1.213.1.4.9", "nia"), ("test", "test"),
                                           ("urn:oid:1.2.250.1.213.1.4.8", "real")])
def test_authorities(oid: str, kind: str) -> None:
    assert parse_ins(NIR, oid).kind == kind


@pytest.mark.parametrize("oid", ["1.2.250.1.213.1.4.2", "1.2.250.1.213.1.4.1", "", "2.25.1"])
def test_other_oids_are_not_ins(oid: str) -> None:
    with pytest.raises(InsError):
        parse_ins(NIR, oid)


def test_cx_form_of_xds_metadata() -> None:
    assert parse_cx(f"{NIR}^^^&{OID_TEST}&ISO") == parse_ins(NIR, OID_TEST)
    with pytest.raises(InsError):
        parse_cx(f"{NIR}^^^&{OID_TEST}")


def test_repr_and_hash_never_show_the_number() -> None:
    ins = parse_ins(NIR, OID_TEST)
    assert NIR not in repr(ins) and NIR not in str(ins) and NIR not in f"{ins}"
    digest = salted_hash(ins, b"salt-a")
    assert NIR not in digest and len(digest) == 16
    assert digest != salted_hash(ins, b"salt-b") and digest == salted_hash(NIR, b"salt-a")


@given(st.text(max_size=40))
def test_any_text_is_an_ins_or_a_clear_error(text: str) -> None:
    try:
        nir = check_nir(text)
    except InsError:
        return
    assert len(nir) == 15 and int(nir[13:]) == nir_key(nir[:13])
