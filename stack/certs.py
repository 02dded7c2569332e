"""A lab certificate authority and the server side of TLS for `tapstack run --tls`.

The CA (an ECDSA P-256 key and a self-signed certificate, ten years) is made once and
kept in a state directory; each server certificate it signs names the node's addresses
and the names given with --tls-name, lives 365 days (under the 398 that browsers
accept), and is kept beside it so later runs reuse it. `tapstack ca` prints the CA's
path, for `curl --cacert`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# TLS 1.2 suites: forward secret AEADs only (TLS 1.3's are all of that kind)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def state_dir() -> str:
    """Where tapstack keeps its CA: $TAPSTACK_STATE, else /var/lib/tapstack as root,
    else ~/.local/state/tapstack."""
    if os.environ.get("TAPSTACK_STATE"):
        return os.environ["TAPSTACK_STATE"]
    if os.geteuid() == 0:
        return "/var/lib/tapstack"
    return os.path.join(os.path.expanduser("~"), ".local", "state", "tapstack")


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class LabCA:
    """The CA in `directory` (ca.pem, ca.key), made on first use."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = os.path.join(directory or state_dir(), "ca")
        self.cert_path = os.path.join(self.directory, "ca.pem")
        self.key_path = os.path.join(self.directory, "ca.key")
        if not (os.path.exists(self.cert_path) and os.path.exists(self.key_path)):
            self._create()
        with open(self.cert_path, "rb") as f:
            self.cert = x509.load_pem_x509_certificate(f.read())
        with open(self.key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), None)

    def _create(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tapstack lab"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "tapstack lab CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(self.key_path, _key_pem(key))
        tmp = self.cert_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.cert_path)

    def issue(self, names: list[str]) -> tuple[str, str]:
        """(certificate chain path, key path) for a server known by these DNS names and
        IP addresses; reused while it has more than 30 days left."""
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("a certificate needs at least one name or address")
        tag = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]
        folder = os.path.join(self.directory, "issued")
        os.makedirs(folder, exist_ok=True)
        cert_path = os.path.join(folder, f"{tag}.pem")
        key_path = os.path.join(folder, f"{tag}.key")
        now = datetime.datetime.now(datetime.UTC)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            with open(cert_path, "rb") as f:
                old = x509.load_pem_x509_certificates(f.read())[0]
            if old.not_valid_after_utc - now > datetime.timedelta(days=30):
                return cert_path, key_path
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                             crl_sign=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.cert.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        _write_private(key_path, _key_pem(key))
        with open(cert_path + ".tmp", "wb") as f:  # the chain: leaf, then the CA
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        os.replace(cert_path + ".tmp", cert_path)
        return cert_path, key_path


@dataclass
class ServerCert:
    cert_path: str
    key_path: str
    names: list[str]  # what SNI may ask for; the first certificate answers anything else


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_NO_COMPRESSION)
    ctx.set_alpn_protocols(["http/1.1"])
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog:
        ctx.keylog_filename = keylog  # for Wireshark/tshark to decrypt a capture
    return ctx


def server_context(certs: list[ServerCert]) -> ssl.SSLContext:
    """A server context: TLS 1.2 and 1.3, the server's cipher order, ALPN http/1.1,
    SSLKEYLOGFILE honoured; with several certificates, SNI picks the one whose names
    include the name asked for."""
    if not certs:
        raise ValueError("no certificate")
    contexts = []
    for cert in certs:
        ctx = _base_context()
        try:
            ctx.load_cert_chain(cert.cert_path, cert.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load {cert.cert_path} with {cert.key_path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        contexts.append((cert, ctx))
    first = contexts[0][1]
    if len(contexts) > 1:
        by_name = {}
        for cert, ctx in contexts:
            for name in cert.names:
                by_name.setdefault(name.lower(), ctx)

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            if name and (ctx := by_name.get(name.lower())) is not None:
                sslobj.context = ctx

        first.sni_callback = pick
    return first
