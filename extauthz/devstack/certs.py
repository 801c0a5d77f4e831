"""A tiny X.509 authority for demos and tests: a CA, X.509-SVIDs and a server certificate.

The certificates follow the X.509-SVID standard closely enough that Envoy (BoringSSL) and
Python's `ssl` accept them and that a strict SVID validator would too:

* the CA is an EC P-256 key, `CA:true` (critical), keyCertSign + cRLSign, and carries the trust
  domain's own SPIFFE ID (`spiffe://<trust-domain>`) as its only URI SAN;
* an SVID is a leaf (`CA:false`, critical) with exactly one URI SAN — the SPIFFE ID —,
  digitalSignature only, EKU clientAuth + serverAuth, and a short validity (one hour by default);
* a server certificate carries DNS and IP SANs for Envoy's listener;
* `issue_dns_only` makes a client certificate from the right CA without any URI SAN: Envoy then
  reports its DNS name as the peer principal, which is *not* a workload identity (a 401).

Nothing here is meant for production issuance: keys are generated in memory and written
unencrypted. Production SVIDs come from SPIRE (or another SPIFFE-conformant issuer).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extauthz.identity.spiffe import check_trust_domain_name, parse_spiffe_id

SVID_VALIDITY = dt.timedelta(hours=1)
CA_VALIDITY = dt.timedelta(days=1)
SERVER_VALIDITY = dt.timedelta(days=1)
# Certificates are backdated a little so that a slightly skewed clock does not reject them.
BACKDATE = dt.timedelta(minutes=5)

DEFAULT_SERVER_DNS = ("*.demo.local", "demo.local", "localhost")
DEFAULT_SERVER_IPS = ("127.0.0.1", "::1")

_ORGANIZATION = "extauthz demo"


@dataclass(frozen=True, slots=True)
class Credential:
    """A PEM certificate (chain) and its PEM private key (PKCS#8, unencrypted)."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def uri_sans(self) -> list[str]:
        return _sans(self.certificate, x509.UniformResourceIdentifier)

    @property
    def dns_sans(self) -> list[str]:
        return _sans(self.certificate, x509.DNSName)


@dataclass(frozen=True, slots=True)
class PemPaths:
    cert: Path
    key: Path


def write_pem(directory: str | os.PathLike[str], name: str, cred: Credential) -> PemPaths:
    """Write `<name>.crt` and `<name>.key` (mode 0600) into `directory`; return their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_path = d / f"{name}.crt"
    key_path = d / f"{name}.key"
    cert_path.write_bytes(cred.cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cred.key_pem)
    return PemPaths(cert_path, key_path)


class CertificateAuthority:
    """A self-signed EC P-256 root for one SPIFFE trust domain."""

    def __init__(
        self, trust_domain: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.trust_domain = check_trust_domain_name(trust_domain)
        self.cert = cert
        self._key = key

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        common_name: str | None = None,
        validity: dt.timedelta = CA_VALIDITY,
    ) -> CertificateAuthority:
        check_trust_domain_name(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{trust_domain} root CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                _key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, cert, key)

    @cached_property
    def cert_pem(self) -> bytes:
        """The trust bundle: this CA's certificate in PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def credential(self) -> Credential:
        return Credential(self.cert_pem, _key_pem(self._key))

    def issue_svid(
        self,
        spiffe_id: str,
        *,
        validity: dt.timedelta = SVID_VALIDITY,
        allow_foreign_trust_domain: bool = False,
    ) -> Credential:
        """An X.509-SVID for `spiffe_id`: a leaf whose only URI SAN is the SPIFFE ID.

        The ID must be a valid SPIFFE ID with a path (a workload, not the trust domain itself)
        and, unless `allow_foreign_trust_domain`, belong to this CA's trust domain.
        """
        sid = parse_spiffe_id(spiffe_id)
        if not sid.path:
            raise ValueError("an SVID's SPIFFE ID must have a path (it names a workload)")
        if sid.trust_domain != self.trust_domain and not allow_foreign_trust_domain:
            raise ValueError(f"{spiffe_id!r} is not in trust domain {self.trust_domain!r}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                # The CN is informative only; relying parties must read the URI SAN.
                x509.NameAttribute(NameOID.COMMON_NAME, (sid.segments or ("svid",))[-1][:64]),
            ]
        )
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))])
        return self._issue_leaf(subject, san, validity)

    def issue_server_cert(
        self,
        dns_names: Iterable[str] = DEFAULT_SERVER_DNS,
        ip_addresses: Iterable[str] = DEFAULT_SERVER_IPS,
        *,
        validity: dt.timedelta = SERVER_VALIDITY,
    ) -> Credential:
        """A TLS server certificate (e.g. for Envoy's listener) with DNS and IP SANs."""
        dns = list(dns_names)
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if not names:
            raise ValueError("a server certificate needs at least one DNS or IP SAN")
        cn = next((n for n in dns if not n.startswith("*")), dns[0] if dns else "server")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
            ]
        )
        return self._issue_leaf(subject, x509.SubjectAlternativeName(names), validity)

    def issue_dns_only(
        self, dns_name: str, *, validity: dt.timedelta = SVID_VALIDITY
    ) -> Credential:
        """A client certificate from this CA whose only SAN is a DNS name (not a workload)."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, dns_name[:64]),
            ]
        )
        san = x509.SubjectAlternativeName([x509.DNSName(dns_name)])
        return self._issue_leaf(subject, san, validity)

    def _issue_leaf(
        self, subject: x509.Name, san: x509.SubjectAlternativeName, validity: dt.timedelta
    ) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + validity, self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(san, critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Credential(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sans(
    cert: x509.Certificate, kind: type[x509.DNSName] | type[x509.UniformResourceIdentifier]
) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(kind)]
