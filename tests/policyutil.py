"""What tests/test_hooks.py and tests/test_policies.py share: fastlb with a plain and a TLS listener and
routes given as TOML, and a client that speaks to either listener."""

import http.client
import json
import re
import ssl
import urllib.request
from pathlib import Path

from conftest import free_port

EXAMPLES = Path(__file__).parent.parent / "examples"


def serve(fastlb, tmp_path, pems, routes: str, backends: dict, *, workers=1, extra="", env=None):
    """`fastlb serve --config`: listeners plain (lb.port) and TLS (lb.tls_port), `routes` and `extra` as
    TOML, backends {name: [Backend, ...]}.  tmp_path and examples/ are on the hook import path."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    plain, tls = free_port(), free_port()
    cert, key = pems.default
    lines = [f"[server]\nworkers = {workers}", extra,
             f"[[listeners]]\naddress = {q(f'127.0.0.1:{plain}')}",
             f"[[listeners]]\naddress = {q(f'127.0.0.1:{tls}')}\ntls = true",
             f"[[tls.certificates]]\ncert = {q(str(cert))}\nkey = {q(str(key))}", routes]
    for name, servers in backends.items():
        lines.append(f"[backends.{name}]\nservers = {q([b.address for b in servers])}")
    config = tmp_path / f"fastlb-{plain}.toml"
    config.write_text("\n\n".join(lines) + "\n")
    lb = fastlb({"FASTLB_LISTEN": f"127.0.0.1:{plain}", "FASTLB_WORKERS": None,
                 "PYTHONPATH": f"{tmp_path}:{EXAMPLES}", **(env or {})}, ["--config", str(config)])
    lb.tls_port = tls
    lb.config = config
    lb.context = ssl.create_default_context(cafile=pems.ca)
    return lb


class Client:
    """One keep-alive connection to the plain ("http") or TLS ("https") listener."""

    def __init__(self, lb, scheme: str):
        if scheme == "https":
            self.conn = http.client.HTTPSConnection("localhost", lb.tls_port, context=lb.context, timeout=10)
        else:
            self.conn = http.client.HTTPConnection("localhost", lb.port, timeout=10)

    def get(self, path: str, headers: dict | None = None, method: str = "GET", body=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        response.body = response.read()
        return response

    def close(self):
        self.conn.close()


def get(lb, scheme: str, path: str, headers: dict | None = None, method: str = "GET", body=None):
    client = Client(lb, scheme)
    try:
        return client.get(path, headers, method, body)
    finally:
        client.close()


def header(record: dict, name: str):
    """The value of a request header a test backend recorded, or None."""
    values = [v for k, v in record["headers"] if k.lower() == name.lower()]
    return values[0] if values else None


def metric(lb, family: str, **labels) -> float:
    """One series from the admin listener's /metrics."""
    address = lb.env["FASTLB_ADMIN_LISTEN"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{family}{{{re.escape(wanted)}}} (\S+)$", text, re.M)
    if match is None:
        raise AssertionError(f"no {family}{{{wanted}}} in /metrics")
    return float(match.group(1))
