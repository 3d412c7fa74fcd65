"""A throwaway CA, server and client certificates, and a Pushgateway web config."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import dataclass

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(directory: str) -> Certs:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orchestrator-push test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                         critical=True)
          # Python 3.13's default context verifies strictly (VERIFY_X509_STRICT):
          # key identifiers are required, as any real CA sets them.
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                            critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    s_cert, s_key = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, True)
    c_cert, c_key = leaf("a task runner", ExtendedKeyUsageOID.CLIENT_AUTH, False)
    j = os.path.join
    return Certs(
        ca=_write(j(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(j(directory, "server.pem"), s_cert),
        server_key=_write(j(directory, "server-key.pem"), s_key),
        client_cert=_write(j(directory, "client.pem"), c_cert),
        client_key=_write(j(directory, "client-key.pem"), c_key),
    )


def web_config(directory: str, certs: Certs | None = None, users: dict[str, str] | None = None,
               client_certs: bool = False) -> str:
    """A --web.config.file (YAML; JSON is YAML) for the Pushgateway."""
    config: dict[str, object] = {}
    if certs is not None:
        tls: dict[str, str] = {"cert_file": certs.server_cert, "key_file": certs.server_key}
        if client_certs:
            tls.update(client_auth_type="RequireAndVerifyClientCert", client_ca_file=certs.ca)
        config["tls_server_config"] = tls
    if users:
        config["basic_auth_users"] = {
            u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()
            for u, p in users.items()}
    return _write(os.path.join(directory, "web.yml"), json.dumps(config).encode())
