"""Kubernetes Ingress manifests imported as routes, through the real server."""

import http.client
import subprocess
import sys

import pytest

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


def test_tls_secret_becomes_a_certificate(tmp_path):
    secret = tmp_path / "shop-tls"
    secret.mkdir()
    (secret / "tls.crt").write_text("x")
    (secret / "tls.key").write_text("x")
    manifest = tmp_path / "tls.yaml"
    manifest.write_text(MANIFEST.format().replace(
        "  ingressClassName: fastlb", "  ingressClassName: fastlb\n  tls:\n  - hosts: [shop.example.com]\n"
        "    secretName: shop-tls"))
    cfg = config.load(str(_services_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")), {}, {})
    out = ingress.apply(cfg, [str(manifest)])
    assert [(c.cert, c.key) for c in out.tls.certificates] == [(str(secret / "tls.crt"), str(secret / "tls.key"))]
