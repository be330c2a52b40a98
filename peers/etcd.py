# SPDX-License-Identifier: GPL-3.0-or-later
"""A real etcd cluster for one test: three ``etcd`` members (Debian's ``etcd-server``) on
127.0.0.1 ports picked by the test, data in a temporary directory, mutual TLS on the client
port as real clusters run (a CA, server certificates for 127.0.0.1, and a client certificate
for the Mandos servers).

Members can be killed and started again (``kill(i)``, ``start_member(i)``), the leader found
(``leader()``), and the cluster's health asked with Debian's ``etcdctl``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peers.process import StartStop
from peers.upstream import free_port

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Tls:
    """The PEM files of a test PKI: the CA, and a client certificate signed by it."""

    cacert: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(directory: Path) -> tuple[Tls, Tls]:
    """A CA, a server certificate (127.0.0.1 and localhost) and a client certificate: the
    (server, client) file sets."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mandos test etcd CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cacert = directory / "ca.pem"
    cacert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False))
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    server_cert, server_key = leaf("etcd-server", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("mandos-server", ExtendedKeyUsageOID.CLIENT_AUTH)
    return Tls(cacert, server_cert, server_key), Tls(cacert, client_cert, client_key)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster(StartStop):
    """``size`` etcd members on 127.0.0.1 with client TLS; ``tls`` is what a client needs."""

    def __init__(self, size: int = 3) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="mandos-test-etcd-"))
        self.directory.chmod(0o700)
        pki = self.directory / "pki"
        pki.mkdir()
        self.server_tls, self.tls = make_pki(pki)
        self.members = [Member(f"m{i}", free_port(), free_port(), self.directory / f"m{i}")
                        for i in range(size)]
        self._initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self._started_once: set[str] = set()

    @property
    def endpoints(self) -> str:
        """The ``--etcd`` value: every member's client URL, comma-separated."""
        return ",".join(m.client_url for m in self.members)

    def server_options(self, prefix: str = "/mandos/") -> list[str]:
        """The ``mandos-server`` options that use this cluster."""
        return [f"--etcd={self.endpoints}", f"--etcd-prefix={prefix}",
                f"--etcd-cacert={self.tls.cacert}", f"--etcd-cert={self.tls.cert}",
                f"--etcd-key={self.tls.key}"]

    def start(self) -> EtcdCluster:
        try:
            for index in range(len(self.members)):
                self.start_member(index, wait=False)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def start_member(self, index: int, *, wait: bool = True) -> None:
        member = self.members[index]
        assert member.process is None or member.process.poll() is not None
        state = "existing" if member.name in self._started_once else "new"
        argv = [ETCD, f"--name={member.name}", f"--data-dir={member.data_dir}",
                f"--listen-client-urls={member.client_url}",
                f"--advertise-client-urls={member.client_url}",
                f"--listen-peer-urls={member.peer_url}",
                f"--initial-advertise-peer-urls={member.peer_url}",
                f"--initial-cluster={self._initial_cluster}",
                f"--initial-cluster-state={state}", "--initial-cluster-token=mandos-test",
                f"--cert-file={self.server_tls.cert}", f"--key-file={self.server_tls.key}",
                f"--trusted-ca-file={self.server_tls.cacert}", "--client-cert-auth",
                "--heartbeat-interval=100", "--election-timeout=1000",
                "--log-outputs=stderr", "--logger=zap"]
        log = open(self.directory / f"{member.name}.log", "ab")  # noqa: SIM115 (kept by Popen)
        with log:
            member.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=log, start_new_session=True)
        self._started_once.add(member.name)
        if wait:
            self.wait_healthy([index])

    def kill(self, index: int) -> None:
        """SIGKILL one member (as a crash would) and reap it."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def etcdctl(self, *args: str, endpoints: str | None = None,
                check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(
            [ETCDCTL, f"--endpoints={endpoints or self.endpoints}",
             f"--cacert={self.tls.cacert}", f"--cert={self.tls.cert}", f"--key={self.tls.key}",
             "--command-timeout=2s", *args],
            capture_output=True, text=True, check=check, env=env, timeout=timeout)

    def wait_healthy(self, indexes: list[int] | None = None) -> None:
        """Wait until the members (all by default) answer as healthy: they have a leader."""
        chosen = [self.members[i] for i in (indexes or range(len(self.members)))]
        endpoints = ",".join(m.client_url for m in chosen)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            for member in chosen:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"etcd {member.name} exited: {self.log(member.name)}")
            result = self.etcdctl("endpoint", "health", endpoints=endpoints, check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy: {result.stderr.strip()}")
            time.sleep(0.1)

    def leader(self) -> int:
        """The index of the member that leads now."""
        result = self.etcdctl("endpoint", "status", "-w", "json")
        statuses = json.loads(result.stdout)
        leader_ids = {s["Status"]["leader"] for s in statuses}
        for status in statuses:
            if status["Status"]["header"]["member_id"] in leader_ids:
                return [m.client_url for m in self.members].index(status["Endpoint"])
        raise RuntimeError(f"no leader in {statuses}")

    def get(self, key: str) -> str | None:
        """A key's value, read with etcdctl (None when it is absent)."""
        lines = self.etcdctl("get", key, "--print-value-only").stdout.splitlines()
        return lines[0] if lines else None

    def keys(self, prefix: str) -> list[str]:
        return self.etcdctl("get", prefix, "--prefix", "--keys-only").stdout.split()

    def log(self, name: str) -> str:
        try:
            return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        for index in range(len(self.members)):
            self.kill(index)
        shutil.rmtree(self.directory, ignore_errors=True)
