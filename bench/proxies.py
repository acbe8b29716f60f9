"""The processes under test: the shared backend nginx and the three proxies (fastlb, nginx, HAProxy).

Every proxy gets the same topology and behaviour: one worker, plain HTTP on 127.0.0.1:8080 and TLS on
127.0.0.1:8443 with the same ECDSA P-256 certificate (TLS 1.2 + 1.3, tickets and session cache on), round
robin over two backends with upstream keep-alive, X-Forwarded-For/-Proto/-Port added, no access log.
nginx and HAProxy run in the foreground from configs generated here; system configs and services are never
touched.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

HOST = "127.0.0.1"
HTTP_PORT = 8080
TLS_PORT = 8443
BACKEND_PORTS = (9101, 9102)
# https-reencrypt: the same backend nginx also serves TLS on these ports (the bench certificate, tickets
# on); each proxy sends REENCRYPT_PATH there over verified TLS, pooled and with sessions resumed.
BACKEND_TLS_PORTS = (9111, 9112)
REENCRYPT_PATH = "/re"
ADMIN_PORT = 9900
SMALL_BODY = b"hello world!\n"  # 13 bytes, the body of `/` on the backends
BIG_SIZE = 64 * 1024  # size of `/big`
# TLS 1.2 suites for an ECDSA certificate, identical for nginx and HAProxy; TLS 1.3 suites stay OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"
# Enough for the idle scenario (2,000 client connections + upstream ones) in every proxy.
MAX_CONNS = 8000


class StartError(RuntimeError):
    """A process under test did not come up; the message says why (and shows its log tail)."""


def port_free(port: int) -> bool:
    """True if nothing listens on HOST:port (SO_REUSEADDR so that TIME_WAIT leftovers do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def nofile_limit() -> int:
    """Raise our soft fd limit to the hard one (the proxies inherit it) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def make_cert(directory: Path) -> tuple[Path, Path, Path]:
    """One ECDSA P-256 certificate for every proxy, generated once; returns (cert, key, cert+key pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, pem = directory / "cert.pem", directory / "key.pem", directory / "combined.pem"
    if not (cert.exists() and key.exists()):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "3650",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
    # HAProxy wants certificate and key in one file.
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    for p in (cert, key, pem):
        p.chmod(0o644)  # nginx workers drop privileges; keep the files readable for them
    return cert, key, pem


class Service:
    """A foreground process tree we start, measure (CPU, RSS over all its processes) and stop."""

    name = "?"
    required_ports: tuple[int, ...] = ()
    optional_ports: tuple[int, ...] = ()
    start_timeout = 10.0

    def __init__(self, workdir: Path, cert: Path, key: Path, pem: Path, nofile: int):
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.cert, self.key, self.pem, self.nofile = cert, key, pem, nofile
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "output.log"
        self.missing: dict[int, str] = {}  # optional port -> why it is unusable

    # -- subclass hooks
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle
    def start(self) -> None:
        ports = self.required_ports + self.optional_ports
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise StartError(f"{self.name}: port(s) {busy} already in use by something else")
        cmd = self.command()  # writes the config file(s)
        with open(self.log, "wb") as out:
            # Own session and process group: stop() can also reach processes that left the tree.
            self.proc = subprocess.Popen(
                cmd,
                env=self.env(),
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.required_ports)
        while pending:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # forked children may outlive a failed master
                raise StartError(f"{self.name}: `{' '.join(cmd)}` exited with code {code}{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StartError(
                    f"{self.name}: port(s) {pending} not listening after "
                    f"{self.start_timeout:.0f}s{self.log_tail()}"
                )
            pending = [p for p in pending if not listening(p)]
            time.sleep(0.1)
        # Optional listeners (fastlb's TLS may land later than its plain one): a short grace, then give up.
        deadline = time.monotonic() + 3
        for port in self.optional_ports:
            while not listening(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not listening(port):
                self.missing[port] = f"{self.name} is not listening on {HOST}:{port}"
        time.sleep(0.3)  # let workers finish initialising before anything is measured

    def stop(self) -> None:
        """Stop the whole tree (TERM, then KILL after 10 s) and wait until its ports are free again."""
        if self.proc is None:
            return
        tree = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for p in tree:  # stragglers (workers that ignored TERM, or a hung master)
            try:
                p.kill()
            except psutil.Error:
                pass
        try:  # orphans reparented away from the tree still carry the process group we created
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc = None
        ports = self.required_ports + self.optional_ports
        deadline = time.monotonic() + 10
        while any(not port_free(p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: ports {ports} still busy after stop")
            time.sleep(0.1)

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n    | " + "\n    | ".join(text)) if text else " (no output)"

    # -- measurements over the whole tree (master + workers + helpers)
    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_split(self) -> tuple[float, float]:
        """(utime, stime) from /proc/<pid>/stat, via psutil, summed over the tree, incl. reaped children."""
        user = system = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            user += t.user + t.children_user
            system += t.system + t.children_system
        return user, system

    def cpu_seconds(self) -> float:
        return sum(self.cpu_split())

    def rss_bytes(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def nginx_common(self) -> str:
        """Paths nginx must not take from its Debian compile-time defaults (/var/lib/nginx, /run)."""
        d = self.dir
        return f"""
worker_processes 1;
pid {d}/nginx.pid;
worker_rlimit_nofile {self.nofile};
events {{ worker_connections {MAX_CONNS}; }}
"""

    def nginx_http_common(self) -> str:
        d = self.dir
        return f"""
    access_log off;
    error_log {d}/error.log warn;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
"""

    def nginx_command(self, conf: str) -> list[str]:
        path = self.dir / "nginx.conf"
        path.write_text(conf)
        # -e: the startup error log, otherwise nginx opens /var/log/nginx/error.log before reading conf.
        return [
            "nginx",
            "-p",
            str(self.dir),
            "-e",
            str(self.dir / "error.log"),
            "-c",
            str(path),
            "-g",
            "daemon off;",
        ]


class Backend(Service):
    """ONE nginx serving both backend ports: 13-byte `/`, 64 KiB `/big`, and `/headers` for sanity checks."""

    name = "backend"
    required_ports = BACKEND_PORTS + BACKEND_TLS_PORTS

    def command(self) -> list[str]:
        html = self.dir / "html"
        html.mkdir(exist_ok=True)
        html.chmod(0o755)
        big = html / "big.bin"
        big.write_bytes(os.urandom(BIG_SIZE))
        big.chmod(0o644)
        listens = "\n".join(f"        listen {HOST}:{p} backlog=4096;" for p in BACKEND_PORTS)
        tls_listens = "\n".join(f"        listen {HOST}:{p} ssl backlog=4096;" for p in BACKEND_TLS_PORTS)
        conf = f"""{self.nginx_common()}
http {{
{self.nginx_http_common()}
    default_type text/plain;
    sendfile on;
    server {{
{listens}
        location = / {{ return 200 "{SMALL_BODY.decode().strip()}\\n"; }}
        location = /big {{ alias {big}; }}
        # Lets the harness check round robin and the X-Forwarded-* headers each proxy adds.
        location = /headers {{
            return 200 "port=$server_port xff=$http_x_forwarded_for proto=$http_x_forwarded_proto port_hdr=$http_x_forwarded_port\\n";
        }}
        # Connections accepted, TLS ones included: upstream connections per request in https-reencrypt.
        location = /stub {{ stub_status; }}
    }}
    server {{
{tls_listens}
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;
        location = {REENCRYPT_PATH} {{ return 200 "{SMALL_BODY.decode().strip()}\\n"; }}
    }}
}}
"""
        return self.nginx_command(conf)


class Fastlb(Service):
    name = "fastlb"
    required_ports = (HTTP_PORT,)
    # The admin listener is not used by the harness; it is listed so its port is verified free after stop.
    optional_ports = (TLS_PORT, ADMIN_PORT)
    start_timeout = 20.0  # Python start-up + fork of worker and control process

    def command(self) -> list[str]:
        plain = ", ".join(f'"{HOST}:{p}"' for p in BACKEND_PORTS)
        tls = ", ".join(f'"{HOST}:{p}"' for p in BACKEND_TLS_PORTS)
        (self.dir / "fastlb.toml").write_text(f"""
[[routes]]
path = "/"
backend = "default"

[[routes]]
path = "{REENCRYPT_PATH}"
backend = "reencrypt"

[backends.default]
servers = [{plain}]

[backends.reencrypt]
servers = [{tls}]

[backends.reencrypt.tls]
ca = "{self.cert}"
server_name = "localhost"
""")
        return [sys.executable, "-m", "fastlb", "serve", "--config", str(self.dir / "fastlb.toml")]

    def env(self) -> dict[str, str]:
        # Drop inherited FASTLB_* (e.g. FASTLB_CONFIG) so that only the settings below shape the topology.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_")}
        env.update(
            FASTLB_WORKERS="1",
            FASTLB_LISTEN=f"{HOST}:{HTTP_PORT}",
            FASTLB_TLS_LISTEN=f"{HOST}:{TLS_PORT}",
            FASTLB_TLS_CERT=str(self.cert),
            FASTLB_TLS_KEY=str(self.key),
            FASTLB_ADMIN_LISTEN=f"{HOST}:{ADMIN_PORT}",
        )
        # The fastlb that is installed (`pip install .` or `-e .`), run from a scratch directory: putting
        # the checkout on PYTHONPATH would shadow a non-editable install with sources that have no
        # compiled extension ("No module named 'fastlb._core'").
        env.pop("PYTHONPATH", None)
        return env


class Nginx(Service):
    name = "nginx"
    required_ports = (HTTP_PORT, TLS_PORT)

    def command(self) -> list[str]:
        servers = "\n".join(f"        server {HOST}:{p};" for p in BACKEND_PORTS)
        tls_servers = "\n".join(f"        server {HOST}:{p};" for p in BACKEND_TLS_PORTS)
        conf = f"""{self.nginx_common()}
http {{
{self.nginx_http_common()}
    upstream backends {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    upstream tls_backends {{
{tls_servers}
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {TLS12_CIPHERS};
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1h;
    ssl_session_tickets on;
    server {{
        listen {HOST}:{HTTP_PORT} backlog=4096;
        listen {HOST}:{TLS_PORT} ssl backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Port $server_port;
            # 64 KiB responses exceed the default in-memory buffers; never spill them to a temp file
            # (HAProxy and fastlb stream through memory, disk writes would only handicap nginx).
            proxy_max_temp_file_size 0;
        }}
        location {REENCRYPT_PATH} {{
            proxy_pass https://tls_backends;
            proxy_ssl_session_reuse on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {self.cert};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Port $server_port;
        }}
    }}
}}
"""
        return self.nginx_command(conf)


class Haproxy(Service):
    name = "haproxy"
    required_ports = (HTTP_PORT, TLS_PORT)

    def command(self) -> list[str]:
        servers = "\n".join(f"    server b{i} {HOST}:{p}" for i, p in enumerate(BACKEND_PORTS, 1))
        # ssl on a server line resumes its sessions by default (no-ssl-reuse turns that off).
        tls_servers = "\n".join(
            f"    server t{i} {HOST}:{p} ssl verify required ca-file {self.cert} sni str(localhost)"
            for i, p in enumerate(BACKEND_TLS_PORTS, 1))
        conf = f"""global
    nbthread 1
    maxconn {MAX_CONNS}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    # no `log` line: no access log

defaults
    mode http
    maxconn {MAX_CONNS}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    # keep-alive on both sides is HAProxy's default; share idle upstream connections like nginx's pool
    http-reuse always
    option forwardfor

frontend fe
    bind {HOST}:{HTTP_PORT}
    bind {HOST}:{TLS_PORT} ssl crt {self.pem}
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http unless {{ ssl_fc }}
    http-request set-header X-Forwarded-Port %[dst_port]
    use_backend be_tls if {{ path_beg {REENCRYPT_PATH} }}
    default_backend be

backend be
    balance roundrobin
{servers}

backend be_tls
    balance roundrobin
{tls_servers}
"""
        path = self.dir / "haproxy.cfg"
        path.write_text(conf)
        return ["haproxy", "-f", str(path), "-db"]


PROXIES: dict[str, type[Service]] = {"fastlb": Fastlb, "nginx": Nginx, "haproxy": Haproxy}
