"""A real etcd + kube-apiserver on 127.0.0.1 for integration tests.

pyproxy's API side (list/watch, bookmarks, relist on 410 Gone, RBAC as kube-proxy, riding out an
API server restart) is only worth testing against the real thing, so this module starts the
binaries built by hack/build-control-plane.sh in a private directory: a generated CA and serving
certificate, a service-account key pair, static tokens for an admin (system:masters) and for
`system:kube-proxy` (which the default bootstrap RBAC binds to ClusterRole system:node-proxier,
exactly what upstream kube-proxy runs as), and a kubeconfig for each.

It never builds: when the binaries are missing, `ControlPlaneError` says how to build them and the
fixtures turn that into a test failure.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import kubernetes

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"

SERVICE_CIDR = "10.96.0.0/16"
# The first address of SERVICE_CIDR is the ClusterIP of default/kubernetes.
SERVICE_CIDR_FIRST_IP = "10.96.0.1"
PROXY_USER = "system:kube-proxy"
#: A deadline, not a measurement: the apiserver in the VM without KVM on a loaded host
#: needed more than 60 s.
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached; the message says why."""


def find_bin_dir() -> Path:
    """Return the directory holding etcd and kube-apiserver, without building anything."""
    try:
        proc = subprocess.run(
            [str(BUILD_SCRIPT), "--print-bin-dir"], capture_output=True, text=True, check=False
        )
    except OSError as e:
        raise ControlPlaneError(f"cannot run {BUILD_SCRIPT}: {e}") from e
    if proc.returncode != 0:
        raise ControlPlaneError(proc.stderr.strip() or f"{BUILD_SCRIPT} --print-bin-dir failed")
    return Path(proc.stdout.strip())


def api_client(kubeconfig: Path) -> kubernetes.client.ApiClient:
    """A `kubernetes` ApiClient authenticated by `kubeconfig` (verifying the server's CA)."""
    client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return client


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise ControlPlaneError("openssl is missing (apt-get install -y openssl)") from e
    except subprocess.CalledProcessError as e:
        raise ControlPlaneError(f"openssl {args[0]} failed: {e.stderr.strip()}") from e


def _http(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 10,
) -> tuple[int, bytes]:
    """One plain HTTP(S) request to etcd or kube-apiserver: (status, body)."""
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Daemon:
    """One long-running binary and its log file, started and stopped by ControlPlane."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        self._log_file = self.log.open("ab")
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            process_group=0,  # a Ctrl-C meant for pytest must not kill it mid-teardown
        )

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with status {self._proc.returncode}; "
                f"last lines of {self.log}:\n{_tail(self.log)}"
            )

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class ControlPlane:
    """etcd + kube-apiserver on free 127.0.0.1 ports, with all state under `workdir`.

    Use as a context manager (or call start/stop); a failed start stops whatever it started.
    """

    def __init__(self, workdir: Path, bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self.kubeconfig_admin = workdir / "kubeconfig-admin"
        self.kubeconfig_proxy = workdir / "kubeconfig-proxy"
        etcd_port, etcd_peer_port, api_port = _free_ports(3)
        self.etcd_endpoint = f"http://127.0.0.1:{etcd_port}"
        self.server = f"https://127.0.0.1:{api_port}"
        self._admin_token = secrets.token_hex(24)
        self._proxy_token = secrets.token_hex(24)
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        self._etcd = _Daemon(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=test",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_endpoint}",
                f"--advertise-client-urls={self.etcd_endpoint}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
                "--unsafe-no-fsync",
            ],
            workdir / "etcd.log",
        )
        self._apiserver = _Daemon(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_endpoint}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={workdir / 'apiserver.crt'}",
                f"--tls-private-key-file={workdir / 'apiserver.key'}",
                f"--client-ca-file={workdir / 'ca.crt'}",
                f"--token-auth-file={workdir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                # Like kubeadm and kind: a kube-proxy DaemonSet runs privileged.
                "--allow-privileged=true",
                # default/kubernetes would point at 127.0.0.1, which the API rejects as an
                # endpoint address (an error logged every 10s): give it no endpoints instead.
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={workdir / 'sa.key'}",
            ],
            workdir / "kube-apiserver.log",
        )
        self._ssl: ssl.SSLContext | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Generate credentials, start etcd and kube-apiserver, wait until both are ready."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._write_credentials()
            self._etcd.start()
            self._wait_ready(self._etcd, f"{self.etcd_endpoint}/health")
            self.start_apiserver()
            self._write_kubeconfig(self.kubeconfig_admin, "admin", self._admin_token)
            self._write_kubeconfig(self.kubeconfig_proxy, PROXY_USER, self._proxy_token)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop kube-apiserver and etcd (the workdir and its logs stay for the caller)."""
        self._apiserver.stop()
        self._etcd.stop()

    def stop_apiserver(self) -> None:
        """Stop only kube-apiserver, as if the API server went away; etcd keeps the data."""
        self._apiserver.stop()

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port, etcd and certificates; wait for /readyz."""
        if self._apiserver.running():
            raise ControlPlaneError("kube-apiserver is already running")
        self._apiserver.start()
        self._wait_ready(self._apiserver, f"{self.server}/readyz")

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- etcd ------------------------------------------------------------------------------

    def compact_etcd(self) -> int:
        """Compact etcd's history up to a new revision and return that revision.

        A marker key outside /registry is written first, so every resourceVersion seen before
        this call is strictly older than the compaction point: any read or watch that reaches
        etcd from such a resourceVersion gets 410 Gone. kube-apiserver's watch cache keeps
        serving watches from its own window, so to make a client's re-watch fail with 410, also
        restart the API server (stop_apiserver/start_apiserver), whose new cache starts at the
        current revision.
        """
        put = self._etcd_call("kv/put", {"key": _b64("pyproxy-compaction-marker"), "value": ""})
        revision = int(put["header"]["revision"])
        self._etcd_call("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _etcd_call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to etcd's gRPC gateway (/v3/...), returning the decoded JSON reply."""
        try:
            status, reply = _http(
                f"{self.etcd_endpoint}/v3/{method}",
                method="POST",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
        except OSError as e:
            raise ControlPlaneError(f"etcd {method} failed: {e}") from e
        if status != 200:
            raise ControlPlaneError(f"etcd {method} failed: HTTP {status}: {reply.decode()}")
        decoded: dict[str, Any] = json.loads(reply)
        return decoded

    # -- helpers ---------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        d = self.workdir
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
            "-subj", "/CN=pyproxy-test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
        )  # fmt: skip
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
            "-keyout", str(d / "apiserver.key"), "-out", str(d / "apiserver.csr"),
        )  # fmt: skip
        sans = ",".join(
            [
                "IP:127.0.0.1",
                f"IP:{SERVICE_CIDR_FIRST_IP}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        (d / "apiserver.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "x509", "-req", "-in", str(d / "apiserver.csr"),
            "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
            "-days", "365", "-extfile", str(d / "apiserver.ext"), "-out", str(d / "apiserver.crt"),
        )  # fmt: skip
        _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
        _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))
        tokens = d / "tokens.csv"
        tokens.write_text(
            f'{self._admin_token},admin,admin,"system:masters"\n'
            f"{self._proxy_token},{PROXY_USER},{PROXY_USER}\n"
        )
        tokens.chmod(0o600)
        self._ssl = ssl.create_default_context(cafile=str(d / "ca.crt"))

    def _write_kubeconfig(self, path: Path, user: str, token: str) -> None:
        ca_data = base64.b64encode((self.workdir / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)

    def _wait_ready(self, daemon: _Daemon, url: str) -> None:
        """Poll `url` until it answers 200; fail early if the daemon exits."""
        headers = {}
        if url.startswith("https:"):
            headers["Authorization"] = f"Bearer {self._admin_token}"
        deadline = time.monotonic() + READY_TIMEOUT
        last_error = ""
        while time.monotonic() < deadline:
            daemon.check_alive()
            try:
                status, body = _http(url, headers=headers, context=self._ssl, timeout=2)
            except OSError as e:
                last_error = str(e)
            else:
                if status == 200:
                    return
                last_error = f"HTTP {status}: {body.decode(errors='replace')[:200]}"
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{daemon.name} not ready at {url} after {READY_TIMEOUT:.0f}s ({last_error}); "
            f"last lines of {daemon.log}:\n{_tail(daemon.log)}"
        )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
