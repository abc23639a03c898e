"""gatewayd.http.x509 reads a certificate's DNS names and expiry as the
cryptography package (trustme's) reads them."""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography import x509 as cx509
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.http.x509 import facts, first_pem_certificate


def reference(pem: bytes) -> tuple[tuple[str, ...], float]:
    cert = cx509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
        dns = tuple(n.lower() for n in names.get_values_for_type(cx509.DNSName))
    except cx509.ExtensionNotFound:
        dns = ()
    return dns, cert.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
@pytest.mark.parametrize("hosts", [("a.example",), ("*.b.example", "B.example", "127.0.0.1"), ("127.0.0.1",)])
def test_names_and_expiry_as_cryptography_reads_them(key_type, hosts):
    ca = trustme.CA(key_type=key_type)
    leaf = ca.issue_cert(*hosts, key_type=key_type,
                         not_after=datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
    pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)  # leaf first, then the CA
    got = facts(first_pem_certificate(pem))
    assert (got.hosts, got.not_after) == reference(pem)
    assert got.not_after == datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()


def test_a_generalized_time_after_2049():
    """RFC 5280: dates from 2050 on are GeneralizedTime, not UTCTime."""
    ca = trustme.CA()
    leaf = ca.issue_cert("a.example", not_after=datetime.datetime(2051, 6, 1, tzinfo=datetime.UTC))
    pem = leaf.cert_chain_pems[0].bytes()
    assert facts(first_pem_certificate(pem)).not_after == reference(pem)[1]


@pytest.mark.parametrize("text", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                  b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"])
def test_what_is_not_a_certificate_is_a_value_error(text):
    with pytest.raises(ValueError):
        facts(first_pem_certificate(text))


_DER = first_pem_certificate(trustme.CA().issue_cert("a.example").cert_chain_pems[0].bytes())


@given(st.lists(st.tuples(st.integers(0, len(_DER) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(1, len(_DER)))
@settings(max_examples=300, deadline=None)
def test_a_damaged_certificate_is_read_or_refused_never_crashes(edits, cut):
    """Bytes changed and the end cut off: either facts, or ValueError (what
    load_certificate turns into a configuration error), nothing else."""
    der = bytearray(_DER[:cut])
    for at, value in edits:
        if at < len(der):
            der[at] = value
    try:
        facts(bytes(der))
    except ValueError:
        pass
