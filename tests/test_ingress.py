"""Kubernetes Ingress manifests imported as routes, through the real server."""

import http.client
import socket
import subprocess
import sys

import pytest
from conftest import free_port

from fastlb import config
from fastlb.lb import ingress

MANIFEST = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
spec:
  ingressClassName: fastlb
  defaultBackend:
    service: {{name: web, port: {{number: 80}}}}
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /api
        pathType: Prefix
        backend:
          service: {{name: api, port: {{number: 8080}}}}
      - path: /api/health
        pathType: Exact
        backend:
          service: {{name: web, port: {{number: 80}}}}
  - host: "*.example.com"
    http:
      paths:
      - path: /
        pathType: ImplementationSpecific
        backend:
          service: {{name: api, port: {{name: http}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: second
spec:
  rules:
  - http:
      paths:
      - path: /static
        pathType: Prefix
        backend:
          service: {{name: web, port: {{number: 80}}}}
"""


def _services_config(tmp_path, api, web):
    cfg = tmp_path / "fastlb.toml"
    cfg.write_text(f'[services]\napi = ["{api}"]\nweb = ["{web}"]\n')
    return cfg


def test_ingress_routes_through_the_server(backends, fastlb, tmp_path):
    api, web = backends("api", "web")
    cfg = _services_config(tmp_path, api.address, web.address)
    manifest = tmp_path / "ingress.yaml"
    manifest.write_text(MANIFEST.format())
    lb = fastlb(args=["--config", str(cfg), "--ingress", str(manifest)])
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for host, path, expected in [
        ("shop.example.com", "/api/cart", "api"),
        ("shop.example.com", "/api/health", "web"),
        ("shop.example.com", "/apix", "api"),       # the wildcard rule (ImplementationSpecific = Prefix)
        ("a.example.com", "/anything", "api"),
        ("other.org", "/static/app.js", "web"),
        ("other.org", "/", "web"),                  # defaultBackend
    ]:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("X-Backend") == expected, (host, path)


@pytest.mark.parametrize("mutation,key,reason", [
    (("pathType: Exact", "pathType: Regex"), "[0].spec.rules[0].http.paths[1].pathType", "expected Exact"),
    (("ingressClassName: fastlb", "ingressClassName: fastlb\n  unknownThing: 1"), "[0].spec.unknownThing",
     "unsupported field"),
    (("{{name: api, port: {{number: 8080}}}}", "{{name: nope, port: {{number: 1}}}}"),
     "[0].spec.rules[0].http.paths[0].backend.service.name", "service 'nope' is not in [services]"),
    (("service: {{name: web, port: {{number: 80}}}}\n  rules", "resource: {{kind: Bucket}}\n  rules"),
     "[0].spec.defaultBackend.resource", "unsupported field"),
    (("pathType: Exact", "pathtype: Exact"), "[0].spec.rules[0].http.paths[1].pathtype",
     "unsupported field (did you mean 'pathType'?)"),
])
def test_unsupported_or_wrong_fields_are_named(tmp_path, mutation, key, reason):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(MANIFEST.replace(*mutation, 1).format())
    cfg = config.load(str(_services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")), {}, {})
    with pytest.raises(config.ConfigError) as err:
        ingress.apply(cfg, [str(manifest)])
    assert err.value.key == key and reason in err.value.reason and err.value.source == str(manifest)
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", str(tmp_path / "fastlb.toml"),
                          "--ingress", str(manifest)], capture_output=True, text=True)
    assert out.returncode == 1 and key in out.stderr and out.stderr.count("\n") == 1


def _secret(tmp_path, *names):
    """A mounted kubernetes.io/tls Secret: <dir>/shop-tls/tls.crt and tls.key for names; its CA."""
    import trustme

    ca = trustme.CA()
    secret = tmp_path / "shop-tls"
    secret.mkdir(exist_ok=True)
    leaf = ca.issue_cert(*names)
    leaf.cert_chain_pems[0].write_to_path(str(secret / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(secret / "tls.key"))
    return secret, ca


def _with_tls(hosts: str) -> str:
    return MANIFEST.format().replace(
        "  ingressClassName: fastlb", f"  ingressClassName: fastlb\n  tls:\n  - hosts: {hosts}\n"
        "    secretName: shop-tls")


def test_tls_secret_becomes_a_certificate(tmp_path):
    secret, _ = _secret(tmp_path, "shop.example.com", "*.shop.example.com")
    manifest = tmp_path / "tls.yaml"
    manifest.write_text(_with_tls("[shop.example.com, a.shop.example.com]"))
    cfg = config.load(str(_services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")), {}, {})
    out = ingress.apply(cfg, [str(manifest)])
    assert [(c.cert, c.key) for c in out.tls.certificates] == [(str(secret / "tls.crt"), str(secret / "tls.key"))]


def test_tls_hosts_the_certificate_does_not_name_are_refused(tmp_path):
    # fastlb picks a certificate by its subjectAltName: a listed host it does not name would get another.
    _secret(tmp_path, "shop.example.com", "*.shop.example.com")
    manifest = tmp_path / "tls.yaml"
    manifest.write_text(_with_tls("[shop.example.com, a.b.shop.example.com]"))
    cfg = config.load(str(_services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")), {}, {})
    with pytest.raises(config.ConfigError) as err:
        ingress.apply(cfg, [str(manifest)])
    assert err.value.key == "[0].spec.tls[0].hosts[1]"
    assert err.value.reason.startswith("'a.b.shop.example.com' is not a name of the secret's certificate")


def _check(cfg, *manifests):
    return subprocess.run([sys.executable, "-m", "fastlb", "check", str(cfg),
                           *(arg for m in manifests for arg in ("--ingress", str(m)))],
                          capture_output=True, text=True)


def test_tls_listener_whose_only_certificate_comes_from_the_ingress(backends, fastlb, tmp_path):
    import ssl

    _, ca = _secret(tmp_path, "shop.example.com")
    api, web = backends("api", "web")
    port = free_port()
    cfg = _services_config(tmp_path, api.address, web.address)
    cfg.write_text(cfg.read_text().replace(
        "[services]", f'[[listeners]]\naddress = "127.0.0.1:{port}"\ntls = true\n\n[services]'))
    manifest = tmp_path / "tls.yaml"
    manifest.write_text(_with_tls("[shop.example.com]"))

    out = _check(cfg, manifest)
    assert out.returncode == 0, out.stderr
    # Without the manifest the listener has no certificate, and the error says where one can come from.
    out = _check(cfg)
    assert out.returncode == 1 and "tls.certificates: TLS listener needs at least one certificate" in out.stderr
    assert "Ingress tls: section" in out.stderr

    fastlb(args=["--config", str(cfg), "--ingress", str(manifest)])
    context = ssl.create_default_context()
    ca.configure_trust(context)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    # The client checks the certificate against shop.example.com: the Ingress secret is what is served.
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="shop.example.com")
    conn.request("GET", "/api/cart", headers={"Host": "shop.example.com"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("X-Backend") == "api"


def test_annotations_and_service_ports_are_never_ignored_silently(tmp_path):
    cfg = _services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")
    manifest = tmp_path / "annotated.yaml"
    manifest.write_text(MANIFEST.format().replace("  name: shop\n", (
        "  name: shop\n  annotations:\n"
        "    kubectl.kubernetes.io/last-applied-configuration: '{}'\n"
        "    cert-manager.io/cluster-issuer: letsencrypt\n"), 1))
    out = _check(cfg, manifest)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    for name in ("kubectl.kubernetes.io/last-applied-configuration", "cert-manager.io/cluster-issuer"):
        assert f"{manifest}: [0].metadata.annotations[{name!r}]: ignored: fastlb reads no annotations" in lines
    assert not any("ingressClassName" in line for line in lines)  # fastlb's own class: nothing to say
    # service.port: once per service and port (api 8080, web 80, api http), where it is first used.
    ports = [line for line in lines if ".service.port: ignored:" in line]
    assert len(ports) == 3, out.stderr
    assert (f"{manifest}: [0].spec.rules[0].http.paths[1].backend.service.port: ignored: the servers of "
            "service 'web', ports included, come from [services].web") in ports

    manifest.write_text(MANIFEST.format().replace("ingressClassName: fastlb", "ingressClassName: nginx"))
    out = _check(cfg, manifest)
    assert out.returncode == 0 and (f"{manifest}: [0].spec.ingressClassName: 'nginx' is not 'fastlb': served "
                                    "anyway, as --ingress names it") in out.stderr.splitlines()

    for annotation in ("nginx.ingress.kubernetes.io/rewrite-target: /$2",
                       "traefik.ingress.kubernetes.io/router.middlewares: auth@file"):
        manifest.write_text(MANIFEST.format().replace("  name: shop\n", f"  name: shop\n  annotations:\n"
                                                      f"    {annotation}\n", 1))
        out = _check(cfg, manifest)
        name = annotation.split(":")[0]
        assert out.returncode == 1 and out.stderr.startswith(
            f"{manifest}: [0].metadata.annotations[{name!r}]: not implemented by fastlb"), out.stderr
        assert out.stderr.count("\n") == 1


def test_errors_name_the_manifest_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")
    (tmp_path / "bad.yaml").write_text(MANIFEST.replace("pathType: Exact", "pathType: Regex").format())
    out = _check("fastlb.toml", "bad.yaml")
    assert out.returncode == 1
    assert out.stderr.startswith(f"{tmp_path / 'bad.yaml'}: [0].spec.rules[0].http.paths[1].pathType: ")
