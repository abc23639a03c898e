"""The two facts the gateway reads from its own certificates: the host names it
is for and when it expires.

Python's ``ssl`` module loads a certificate into a context but has no public
way to read one, and a whole X.509 library for two fields is more than they
need: this walks the DER just far enough (RFC 5280 §4.1). Anything it cannot
walk is a ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
from dataclasses import dataclass

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)

_SEQUENCE, _SET, _OID, _OCTETS, _BOOLEAN = 0x30, 0x31, 0x06, 0x04, 0x01
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_VERSION, _EXTENSIONS = 0xA0, 0xA3  # [0] and [3] EXPLICIT in TBSCertificate
_DNS_NAME = 0x82  # GeneralName dNSName, [2] IMPLICIT IA5String
_COMMON_NAME = bytes((0x55, 0x04, 0x03))  # 2.5.4.3
_SUBJECT_ALT_NAME = bytes((0x55, 0x1D, 0x11))  # 2.5.29.17


@dataclass(frozen=True)
class CertificateFacts:
    hosts: tuple[str, ...]  # DNS names of subjectAltName, else the subject's common name
    not_after: float  # seconds since the epoch


def first_pem_certificate(pem: bytes) -> bytes:
    """The DER of the first certificate in a PEM text (the leaf, in a chain file)."""
    m = _PEM.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    try:
        return base64.b64decode(m.group(1), validate=False)
    except binascii.Error:
        raise ValueError("a PEM certificate that is not base64") from None


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at ``pos``."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(der, pos, end)
        out.append((tag, s, e))
        pos = e
    return out


def _time(der: bytes, tag: int, s: int, e: int) -> float:
    text = der[s:e].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif tag != _GENERALIZED_TIME:
        raise ValueError("not a time")
    if not text.endswith("Z") or len(text) != 15:
        raise ValueError("a time not in UTC")
    fields = (int(text[0:4]), int(text[4:6]), int(text[6:8]),
              int(text[8:10]), int(text[10:12]), int(text[12:14]))
    return float(calendar.timegm((*fields, 0, 0, 0)))


def _common_name(der: bytes, s: int, e: int) -> str | None:
    for _, rs, re_ in _children(der, s, e):  # RelativeDistinguishedName (SET)
        for _, as_, ae in _children(der, rs, re_):  # AttributeTypeAndValue (SEQUENCE)
            parts = _children(der, as_, ae)
            if len(parts) == 2 and der[parts[0][1]:parts[0][2]] == _COMMON_NAME:
                return der[parts[1][1]:parts[1][2]].decode("utf-8", "replace")
    return None


def _dns_names(der: bytes, s: int, e: int) -> list[str]:
    names = []
    for _, xs, xe in _children(der, s, e):  # Extension
        parts = _children(der, xs, xe)
        if not parts or parts[0][0] != _OID or der[parts[0][1]:parts[0][2]] != _SUBJECT_ALT_NAME:
            continue
        tag, os_, oe = parts[-1]
        if tag != _OCTETS:
            raise ValueError("a subjectAltName that is not an OCTET STRING")
        _, gs, ge = _tlv(der, os_, oe)  # GeneralNames (SEQUENCE)
        for gtag, ns, ne in _children(der, gs, ge):
            if gtag == _DNS_NAME:
                names.append(der[ns:ne].decode("ascii", "replace").lower())
    return names


def facts(der: bytes) -> CertificateFacts:
    """Host names and expiry of a DER certificate."""
    _, cs, ce = _tlv(der, 0, len(der))  # Certificate
    tag, ts, te = _tlv(der, cs, ce)  # TBSCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a certificate")
    fields = _children(der, ts, te)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ...
    if len(fields) < 6:
        raise ValueError("not a certificate")
    validity = _children(der, fields[3][1], fields[3][2])
    if len(validity) != 2:
        raise ValueError("a certificate without its validity")
    not_after = _time(der, *validity[1])
    names: list[str] = []
    for tag, s, e in fields[6:]:
        if tag == _EXTENSIONS:
            _, es, ee = _tlv(der, s, e)
            names = _dns_names(der, es, ee)
    if not names:
        cn = _common_name(der, fields[4][1], fields[4][2])
        names = [cn.lower()] if cn else []
    return CertificateFacts(tuple(names), not_after)
