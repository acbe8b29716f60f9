"""Kubernetes `networking.k8s.io/v1` Ingress manifests turned into fastlb routes and backends.

Service names resolve to servers through the config's `[services]` map (name -> addresses): fastlb
does not talk to the Kubernetes API.  A TLS secret is read from `<manifest dir>/<secretName>/tls.crt`
and `tls.key`, the layout a mounted `kubernetes.io/tls` Secret has.  `pathType: ImplementationSpecific`
is treated as Prefix.  Nothing is ignored without a word:

- a field fastlb does not implement is an error naming it;
- the common ingress-nginx annotations become the route policies that do the same (on every route of
  that Ingress): `rewrite-target` (a plain path, no `$1` capture) is `rewrite_prefix`,
  `whitelist-source-range` / `allowlist-source-range` is `allow`, `denylist-source-range` is `deny`,
  `limit-rps` / `limit-rpm` (with `limit-burst-multiplier`, default 5 as in ingress-nginx) is a
  `rate_limit` by client address;
- any other annotation in an ingress controller's namespace (`traefik.ingress.kubernetes.io/...`, the
  rest of `nginx.ingress.kubernetes.io/`: any `*ingress.kubernetes.io/` key) is an error naming it,
  because it changes what a request gets (a redirect, an auth check) and serving the manifest without
  it would send traffic where the manifest says it must not go;
- any other annotation (kubectl's `last-applied-configuration`, cert-manager's, external-dns's: the
  bookkeeping every real manifest carries) is logged as ignored, one warning each, since refusing them
  would refuse almost every manifest in use;
- a `tls[].hosts` entry the secret's certificate does not name is an error: certificates are picked by
  their subjectAltName, so that host would be served another one;
- an `ingressClassName` other than `fastlb` is logged: `--ingress` chose the manifest, so it is served;
- `service.port` is logged as ignored once per service and port: the servers, and so their ports, come
  from `[services]`; a Service port is usually not the endpoints' port (80 in front of 8080), so it cannot
  be checked against them either.
"""

import dataclasses
import difflib
import ipaddress
import logging
import os

from fastlb.config import BackendSpec, CertSpec, ConfigError, RateLimitSpec, RouteSpec, ServerSpec
from fastlb.net import certs as certificates

_PATH_TYPES = {"Exact": "exact", "Prefix": "prefix", "ImplementationSpecific": "prefix"}
_SPEC_FIELDS = {"rules", "defaultBackend", "tls", "ingressClassName"}
# The annotation namespace ingress controllers configure request handling with (ingress-nginx, Traefik,
# the AWS load balancer controller, ...): `<anything>ingress.kubernetes.io/<name>`.
_CONTROLLER_ANNOTATION = "ingress.kubernetes.io"
# ingress-nginx annotations fastlb maps to route policies (limit-burst-multiplier only with a limit).
_NGINX = "nginx.ingress.kubernetes.io/"
_MAPPED = {"rewrite-target", "whitelist-source-range", "allowlist-source-range", "denylist-source-range",
           "limit-rps", "limit-rpm", "limit-burst-multiplier"}

log = logging.getLogger("fastlb.ingress")


def apply(cfg, files: list[str]):
    """cfg extended with the routes, backends and certificates of every Ingress in files.

    Errors and warnings name each file by its absolute path, as every config error does. Warnings are
    logged only once every manifest is accepted, so a refused one is still a single line.
    """
    routes, backends, certs = list(cfg.routes), dict(cfg.backends), list(cfg.tls.certificates)
    default = cfg.default_backend
    warnings: dict[str, None] = {}  # ordered and without repeats
    ports_seen: set[tuple[str, object]] = set()  # (service, port): warned about once per load
    for path in map(os.path.abspath, files):
        for index, doc in enumerate(_documents(path)):
            reader = _Reader(path, f"[{index}]", cfg, backends, warnings, ports_seen)
            new_routes, new_default, new_certs = reader.ingress(doc)
            routes.extend(new_routes)
            certs.extend(new_certs)
            if new_default is not None:
                if default is not None:
                    raise ConfigError(path, f"[{index}].spec.defaultBackend", "a default backend is already set")
                default = new_default
    for warning in warnings:
        log.warning("%s", warning)
    return dataclasses.replace(
        cfg, routes=tuple(routes), backends=backends, default_backend=default,
        tls=dataclasses.replace(cfg.tls, certificates=tuple(certs)),
    )


def _documents(path: str) -> list:
    try:
        import yaml
    except ImportError:
        raise ConfigError(path, "-", "reading Ingress files needs PyYAML: pip install PyYAML") from None
    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as exc:
        raise ConfigError(path, "-", f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "-", "invalid YAML: " + " ".join(str(exc).split())) from None


class _Reader:
    def __init__(self, path, prefix, cfg, backends, warnings, ports_seen):
        self.path = path
        self.prefix = prefix
        self.cfg = cfg
        self.backends = backends
        self.warnings = warnings
        self.ports_seen = ports_seen

    def fail(self, key: str, reason: str):
        return ConfigError(self.path, self.prefix + key, reason)

    def warn(self, key: str, reason: str) -> None:
        self.warnings[f"{self.path}: {self.prefix}{key}: {reason}"] = None

    def table(self, value, key: str, allowed: set[str] | None) -> dict:
        """value as a mapping whose keys are all in allowed (None: any key)."""
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for name in value:
            if allowed is not None and name not in allowed:
                close = difflib.get_close_matches(str(name), sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{key}.{name}", "unsupported field" + hint)
        return value

    def ingress(self, doc):
        doc = self.table(doc, "", {"apiVersion", "kind", "metadata", "spec", "status"})
        if doc.get("apiVersion") != "networking.k8s.io/v1" or doc.get("kind") != "Ingress":
            raise self.fail(".kind", "expected apiVersion networking.k8s.io/v1, kind Ingress")
        # The rest of metadata (name, namespace, labels, uid, managedFields, ...) names the object and
        # never changes how it routes.
        policies = self.annotations(self.table(doc.get("metadata") or {}, ".metadata", None))
        spec = self.table(doc.get("spec") or {}, ".spec", _SPEC_FIELDS)
        ingress_class = spec.get("ingressClassName")
        if ingress_class not in (None, "fastlb"):
            # In a cluster the class picks the controller; here the --ingress flag already chose.
            self.warn(".spec.ingressClassName", f"{ingress_class!r} is not 'fastlb': served anyway, as --ingress names it")
        routes = []
        for r, rule in enumerate(spec.get("rules") or []):
            key = f".spec.rules[{r}]"
            rule = self.table(rule, key, {"host", "http"})
            host = rule.get("host")
            if host is not None:
                host = str(host).lower()
                if "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
                    raise self.fail(f"{key}.host", f"invalid host {host!r}")
            http = self.table(rule.get("http") or {}, f"{key}.http", {"paths"})
            for p, item in enumerate(http.get("paths") or []):
                pkey = f"{key}.http.paths[{p}]"
                item = self.table(item, pkey, {"path", "pathType", "backend"})
                kind = item.get("pathType")
                if kind not in _PATH_TYPES:
                    raise self.fail(f"{pkey}.pathType", "expected Exact, Prefix or ImplementationSpecific")
                path = item.get("path", "/")
                if not isinstance(path, str) or not path.startswith("/"):
                    raise self.fail(f"{pkey}.path", "must start with /")
                backend = self.backend(item.get("backend"), f"{pkey}.backend")
                routes.append(RouteSpec(host=host, path=path, match=_PATH_TYPES[kind], backend=backend,
                                        **policies))
        default = None
        if "defaultBackend" in spec:
            default = self.backend(spec["defaultBackend"], ".spec.defaultBackend")
        certs = []
        for t, entry in enumerate(spec.get("tls") or []):
            key = f".spec.tls[{t}]"
            entry = self.table(entry, key, {"hosts", "secretName"})
            secret = entry.get("secretName")
            if not isinstance(secret, str) or not secret:
                raise self.fail(f"{key}.secretName", "required")
            folder = os.path.join(os.path.dirname(os.path.abspath(self.path)), secret)
            cert, key_file = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
            for name, file in (("tls.crt", cert), ("tls.key", key_file)):
                if not os.access(file, os.R_OK):
                    raise self.fail(f"{key}.secretName", f"cannot read {name} of secret {secret!r} at {file}")
            self.hosts_covered(entry.get("hosts") or [], cert, key)
            certs.append(CertSpec(cert=cert, key=key_file))
        return routes, default, certs

    def hosts_covered(self, hosts, cert: str, key: str) -> None:
        """Each of `tls[].hosts` must be a name of the secret's certificate. fastlb picks a certificate
        by the names in its subjectAltName, not by `hosts`, so a host the certificate does not name
        would be served another certificate: refused rather than ignored."""
        if not isinstance(hosts, list):
            raise self.fail(f"{key}.hosts", f"expected a list, got {type(hosts).__name__}")
        if not hosts:
            return
        try:
            names = certificates.certificate_dns_names(certificates.load_certificate_chain(cert)[0])
        except certificates.CertificateFileError as exc:
            raise self.fail(f"{key}.secretName", str(exc)) from None
        for h, host in enumerate(hosts):
            name = str(host).lower().rstrip(".")
            parent = name.partition(".")[2]
            # RFC 6125 section 6.4.3: a wildcard covers exactly one, leftmost, label.
            if name not in names and not (parent and f"*.{parent}" in names):
                raise self.fail(f"{key}.hosts[{h}]", f"{name!r} is not a name of the secret's certificate "
                                f"({', '.join(names) or 'no subjectAltName'}): that host would get another one")

    def annotations(self, metadata: dict) -> dict:
        """The RouteSpec fields the Ingress's annotations set (see the module docstring)."""
        annotations = self.table(metadata.get("annotations") or {}, ".metadata.annotations", None)
        policies: dict = {}
        for name, value in annotations.items():
            key = f".metadata.annotations[{str(name)!r}]"
            short = str(name).removeprefix(_NGINX)
            if str(name).startswith(_NGINX) and short in _MAPPED:
                if not isinstance(value, str):
                    raise self.fail(key, f"expected a string, got {type(value).__name__}")
                self.policy(short, value.strip(), key, policies, annotations)
            elif str(name).partition("/")[0].endswith(_CONTROLLER_ANNOTATION):
                raise self.fail(key, "not implemented by fastlb: this annotation changes how requests are "
                                "handled; remove it or express it in fastlb's config")
            else:
                self.warn(key, "ignored: fastlb reads no annotations")
        limits = [n for n in ("limit-rps", "limit-rpm") if _NGINX + n in annotations]
        if len(limits) > 1 or (not limits and _NGINX + "limit-burst-multiplier" in annotations):
            raise self.fail(".metadata.annotations", "give one of limit-rps and limit-rpm "
                            "(limit-burst-multiplier scales its burst)")
        return policies

    def policy(self, name: str, value: str, key: str, policies: dict, annotations: dict) -> None:
        if name == "rewrite-target":
            # ingress-nginx rewrites the whole matched path to this; with use-regex its `$1`, `$2` are the
            # path regex's captures, which fastlb's prefix routes do not have.
            if "$" in value:
                raise self.fail(key, "not implemented by fastlb: capture groups ($1...) need regex paths; "
                                "a plain path is supported (it replaces the matched prefix)")
            if not value.startswith("/") or any(c in value for c in "?# \t"):
                raise self.fail(key, f"{value!r} is not a plain URL path")
            policies["rewrite_prefix"] = value
        elif name in ("whitelist-source-range", "allowlist-source-range", "denylist-source-range"):
            cidrs = []
            for item in filter(None, (part.strip() for part in value.split(","))):
                try:
                    cidrs.append(str(ipaddress.ip_network(item, strict=False)))
                except ValueError as e:
                    raise self.fail(key, f"invalid CIDR {item!r}: {e}") from None
            field = "deny" if name.startswith("deny") else "allow"
            policies[field] = tuple(policies.get(field, ())) + tuple(cidrs)
        elif name in ("limit-rps", "limit-rpm"):
            if not value.isdigit() or int(value) == 0:
                raise self.fail(key, f"expected a positive integer, got {value!r}")
            multiplier = str(annotations.get(_NGINX + "limit-burst-multiplier", "5")).strip()
            if not multiplier.isdigit() or int(multiplier) == 0:
                raise self.fail(f".metadata.annotations['{_NGINX}limit-burst-multiplier']",
                                f"expected a positive integer, got {multiplier!r}")
            per_second = int(value) / (1 if name == "limit-rps" else 60)
            policies["rate_limit"] = RateLimitSpec(
                rate=per_second, burst=int(value) * int(multiplier), key="client_ip")

    def backend(self, value, key: str) -> str:
        value = self.table(value, key, {"service"})
        service = self.table(value.get("service") or {}, f"{key}.service", {"name", "port"})
        name = service.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(f"{key}.service.name", "required")
        port = self.table(service.get("port") or {}, f"{key}.service.port", {"number", "name"})
        addresses = self.cfg.services.get(name)
        if not addresses:
            raise self.fail(f"{key}.service.name", f"service {name!r} is not in [services]")
        port_id = port.get("number") or port.get("name")
        if port_id is not None and (name, port_id) not in self.ports_seen:
            self.ports_seen.add((name, port_id))
            self.warn(f"{key}.service.port",
                      f"ignored: the servers of service {name!r}, ports included, come from [services].{name}")
        backend = f"{name}-{port_id or 'default'}"
        if backend not in self.backends:
            self.backends[backend] = BackendSpec(
                name=backend, servers=tuple(ServerSpec(address=a, weight=1) for a in addresses))
        return backend
