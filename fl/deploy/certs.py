"""TLS certificates for a SuperLink and authentication keys for SuperNodes, without openssl.

    python -m fl.deploy.certs tls --out certs --host 192.168.1.10 --host superlink.local
    python -m fl.deploy.certs supernode --out keys --name pi-kitchen

``tls`` writes a private CA (``ca.crt``, ``ca.key``) and a server certificate signed by it
(``server.pem``, ``server.key``) whose subject alternative names are the given hosts (IP addresses
or DNS names the SuperNodes will dial) plus 127.0.0.1 and localhost (the SuperLink's own ServerApp
runner dials it there, over TLS too): the SuperLink gets ``--ssl-ca-certfile ca.crt
--ssl-certfile server.pem --ssl-keyfile server.key``, every SuperNode and the ``flwr`` CLI get
``ca.crt`` as their root certificate. ``supernode`` writes an ECDSA P-384 key pair in OpenSSH
format, the form Flower 1.41 reads: ``<name>`` (private, stays on the device, passed as
``--auth-supernode-private-key``) and ``<name>.pub`` (registered on the SuperLink with
``flwr supernode register <name>.pub <connection>``). Keep ``ca.key`` off the SuperLink host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALID_DAYS = 365
LOOPBACK = ("127.0.0.1", "localhost")  # always in the server certificate (see the module docstring)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    private: Path
    public: Path


def make_tls(out: str | os.PathLike, hosts: list[str], days: int = VALID_DAYS) -> TlsFiles:
    """A private CA and a server certificate for ``hosts`` (and loopback) signed by it, under ``out``."""
    if not hosts:
        raise ValueError("give at least one host (IP address or DNS name) the SuperNodes connect to")
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK]))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-delta-sim federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(folder / "ca.crt", folder / "ca.key", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.ca_key, _pem(ca_key))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem(server_key))
    return files


def make_node_keys(out: str | os.PathLike, name: str) -> NodeKeys:
    """An ECDSA P-384 key pair in OpenSSH format: ``out/name`` (private) and ``out/name.pub``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(folder / name, folder / f"{name}.pub")
    _write_private(keys.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    keys.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fl.deploy.certs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tls = sub.add_parser("tls", help="a private CA and the SuperLink's server certificate")
    tls.add_argument("--out", default="certs", help="folder for ca.crt, ca.key, server.pem, server.key")
    tls.add_argument("--host", action="append", required=True,
                     help="IP address or DNS name SuperNodes use to reach the SuperLink (repeatable)")
    tls.add_argument("--days", type=int, default=VALID_DAYS)
    node = sub.add_parser("supernode", help="a SuperNode's authentication key pair")
    node.add_argument("--out", default="keys")
    node.add_argument("--name", required=True, help="file name of the private key (the .pub is beside it)")
    args = parser.parse_args(argv)
    if args.what == "tls":
        files = make_tls(args.out, args.host, args.days)
        print(f"SuperLink: --ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.server_cert} "
              f"--ssl-keyfile {files.server_key}\nSuperNodes and flwr: root certificate {files.ca_cert} "
              f"(keep {files.ca_key} offline)")
    else:
        keys = make_node_keys(args.out, args.name)
        print(f"on the device: --auth-supernode-private-key {keys.private}\n"
              f"on the SuperLink side: flwr supernode register {keys.public} <connection>")


if __name__ == "__main__":
    main()
