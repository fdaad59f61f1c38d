"""A certificate authority for the lab and for tests, minted with ``cryptography``.

Every lab origin gets a real certificate for its names, signed by a CA that exists only for the
run; clients (curl with ``--cacert``, our own TLS code) trust that CA and nothing else, so the TLS
they speak in tests is the real thing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class Issued:
    """A leaf certificate and its key, both PEM."""

    cert_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]

    def server_context(self, *, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A server-side TLS context presenting this certificate."""
        import tempfile

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        # ssl only loads certificates from files
        with tempfile.TemporaryDirectory() as tmp:
            cert = Path(tmp, "cert.pem")
            key = Path(tmp, "key.pem")
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            key.chmod(0o600)
            ctx.load_cert_chain(cert, key)
        return ctx


@dataclass(slots=True)
class LabCA:
    """A throwaway CA: ``issue()`` signs leaf certificates for any names or IPs."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    _issued: dict[tuple[str, ...], Issued] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str = "sidestep lab CA") -> LabCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_cert(self, path: str | Path) -> Path:
        """Write the CA certificate (PEM) for clients such as ``curl --cacert``."""
        p = Path(path)
        p.write_bytes(self.cert_pem)
        return p

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts this CA only."""
        ctx = ssl.create_default_context(cadata=self.cert_pem.decode())
        return ctx

    def issue(self, *names: str) -> Issued:
        """A leaf certificate valid for ``names`` (DNS names or IP literals); cached."""
        if not names:
            raise ValueError("a certificate needs at least one name")
        cached = self._issued.get(names)
        if cached is not None:
            return cached
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem,
            key_pem=_pem_key(key),
            names=names,
        )
        self._issued[names] = issued
        return issued
