"""Throwaway PKI for a local control plane: one CA, the API server's serving cert, client certs and the
service-account signing key. ECDSA P-256 everywhere (generation is instant; Kubernetes, Go, OpenSSL and
Python's ssl module all accept it). Validity is one year; a cluster lives minutes."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


@dataclass
class CertPair:
    cert: Path
    key: Path


class PKI:
    """Writes everything into ``folder``; attributes are the file paths."""

    def __init__(self, folder: Path, service_ip: str = "10.96.0.1") -> None:
        self.dir = folder
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        self._not_before, self._not_after = now, now + dt.timedelta(days=365)

        ca_key = _key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "finetune-devcluster-ca")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self._ca, self._ca_key = ca, ca_key
        self.ca = CertPair(self._write("ca.crt", _pem_cert(ca)), self._write("ca.key", _pem_key(ca_key)))

        dns = [
            "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster", "kubernetes.default.svc.cluster.local",
        ]
        self.apiserver = self.issue(
            "apiserver", "kube-apiserver", server=True,
            dns=dns, ips=["127.0.0.1", "::1", service_ip],
        )
        self.admin = self.issue("admin", "finetune-devcluster-admin", orgs=["system:masters"])
        self.controller_manager = self.issue("controller-manager", "system:kube-controller-manager")
        self.scheduler = self.issue("scheduler", "system:kube-scheduler")
        # kwok patches node and pod status and node leases; simplest honest identity is an admin.
        self.kwok = self.issue("kwok", "kwok-controller", orgs=["system:masters"])
        # What the API server shows a real node's kubelet (logs, exec); as kubeadm's apiserver-kubelet-client.
        self.kubelet_client = self.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", orgs=["system:masters"])

        sa = _key()
        self.sa_key = self._write("sa.key", _pem_key(sa))
        self.sa_pub = self._write(
            "sa.pub",
            sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        )

    @classmethod
    def load(cls, folder: Path) -> "PKI":
        """The CA written earlier into ``folder``, to ``issue`` more certificates (e.g. a node's); only
        ``dir``, ``ca`` and ``issue`` are usable on the result."""
        self = cls.__new__(cls)
        self.dir = folder
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        self._not_before, self._not_after = now, now + dt.timedelta(days=365)
        self.ca = CertPair(folder / "ca.crt", folder / "ca.key")
        self._ca = x509.load_pem_x509_certificate(self.ca.cert.read_bytes())
        self._ca_key = serialization.load_pem_private_key(self.ca.key.read_bytes(), password=None)
        return self

    def _write(self, name: str, data: bytes) -> Path:
        p = self.dir / name
        p.write_bytes(data)
        if name.endswith(".key"):
            p.chmod(0o600)
        return p

    def issue(
        self,
        name: str,
        cn: str,
        orgs: list[str] | None = None,
        server: bool = False,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> CertPair:
        """A leaf certificate signed by the CA (client auth, plus server auth when ``server``)."""
        key = _key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs or []]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                    content_commitment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if server
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        if dns or ips:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = b.sign(self._ca_key, hashes.SHA256())
        return CertPair(self._write(f"{name}.crt", _pem_cert(cert)), self._write(f"{name}.key", _pem_key(key)))
