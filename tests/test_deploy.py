"""deploy/ and examples/: what can be checked without a cluster, a container registry or systemd as
PID 1.  Kubernetes manifests against the Kubernetes schemas (offline, kubernetes-validate) and against
the config they carry; the Dockerfile's entrypoint, health check and the pod's preStop run for real on
that config; the systemd unit through `systemd-analyze verify` and its commands against a NOTIFY_SOCKET
this test owns; every example through `fastlb check`."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import trustme
import yaml
from conftest import free_port
from cryptography import x509
from test_nodes import MountedConfigMap, settles_on

ROOT = Path(__file__).parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def run_fastlb(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def write_certificates(directory: Path, paths) -> None:
    """A certificate and key at each (cert, key) path under directory, for the name its file is named
    after (certs/wildcard.shop.example.net.pem: *.shop.example.net; tls.crt: example.com)."""
    ca = trustme.CA()
    for cert, key in paths:
        stem = Path(cert).stem
        name = "*." + stem.removeprefix("wildcard.") if stem.startswith("wildcard.") else stem
        issued = ca.issue_cert(name if "." in name else "example.com")
        (directory / cert).parent.mkdir(parents=True, exist_ok=True)
        issued.cert_chain_pems[0].write_to_path(str(directory / cert))
        issued.private_key_pem.write_to_path(str(directory / key))


# -- examples/ --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_fastlb_check(example, tmp_path):
    config = tomllib.loads(example.read_text())
    certificates = [(c["cert"], c["key"]) for c in config.get("tls", {}).get("certificates", [])]
    write_certificates(tmp_path, certificates)  # what the reader puts next to the file
    copy = tmp_path / example.name
    shutil.copy(example, copy)
    done = run_fastlb("check", str(copy))
    assert (done.returncode, done.stdout.strip()) == (0, f"{copy}: ok"), done.stderr


def test_examples_cover_the_common_set_ups():
    names = {p.name for p in EXAMPLES}
    assert {"fastlb.toml", "single-site.toml", "several-hosts.toml", "canary.toml"} <= names
    single = tomllib.loads((ROOT / "examples" / "single-site.toml").read_text())
    assert [lst.get("tls", False) for lst in single["listeners"]] == [True, False]
    assert single["listeners"][1]["redirect_to_https"] is True
    canary = tomllib.loads((ROOT / "examples" / "canary.toml").read_text())["backends"]["app"]
    weights = [s["weight"] for s in canary["servers"]]
    assert canary["balance"] == "hash" and min(weights) / sum(weights) == 0.05


def test_the_complete_example_sets_every_section_and_server_key():
    """examples/fastlb.toml is the commented reference: every [server] key and every section of the
    schema appears in it (set, or as a commented line where it needs a file of its own)."""
    import dataclasses

    from fastlb import config

    text = (ROOT / "examples" / "fastlb.toml").read_text()
    for f in dataclasses.fields(config.ServerSection):
        assert re.search(rf"^{f.name} = ", text, re.M), f"server.{f.name} missing"
    for f in dataclasses.fields(config.Config):
        if f.name != "source":
            assert re.search(rf"^(# )?(\[+|){f.name}\b", text, re.M), f"{f.name} missing"


# -- deploy/kubernetes/ -----------------------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("version", ["1.29", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate_against_the_schemas(version):
    docs = manifests()
    assert set(docs) == {"ConfigMap", "Deployment", "DaemonSet", "Service", "PodDisruptionBudget"}
    for kind, doc in docs.items():
        # strict: an unknown field (a typo) fails too, as kubectl apply --validate=strict would.
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind}: {exc}") from None


def configmap_config() -> tuple[str, dict]:
    text = manifests()["ConfigMap"]["data"]["fastlb.toml"]
    return text, tomllib.loads(text)


def seconds(text: str) -> float:
    from fastlb.units import parse_duration

    return parse_duration(text)


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_the_pod_fits_its_config(kind):
    docs = manifests()
    _, cfg = configmap_config()
    spec = docs[kind]["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # Draining is covered: the kubelet's SIGKILL comes after drain_delay + graceful_timeout, and the
    # liveness probe cannot fail the pod while /healthz answers 503 for that long.
    server = cfg["server"]
    drain = seconds(server["drain_delay"]) + seconds(server["graceful_timeout"])
    assert drain >= seconds(server["drain_delay"]) > 0
    assert pod["terminationGracePeriodSeconds"] > drain
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["fastlb", "stop"]
    assert server["watch"] is True

    # Probes on the admin /healthz, reachable on the pod IP; ports as the listeners have them.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin_port = int(cfg["admin"]["address"].rsplit(":", 1)[1])
    assert cfg["admin"]["address"].startswith("0.0.0.0:")
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz"
        assert ports[probe["httpGet"]["port"]] == admin_port
    listener_ports = {int(lst["address"].rsplit(":", 1)[1]) for lst in cfg["listeners"]}
    service_targets = {ports[p["targetPort"]] for p in docs["Service"]["spec"]["ports"]}
    assert service_targets == listener_ports
    assert "admin" not in {p["targetPort"] for p in docs["Service"]["spec"]["ports"]}

    # Workers match the CPU limit (an affinity mask would show every core of the node).
    assert server["workers"] == int(container["resources"]["limits"]["cpu"])

    # Mounted as directories (a subPath mount is never updated), where the config reads them.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert all("subPath" not in m for m in mounts.values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_arg = container["args"][container["args"].index("--config") + 1]
    (config_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[config_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert os.path.dirname(config_arg) == mounts[config_volume]["mountPath"]
    assert os.path.basename(config_arg) in docs["ConfigMap"]["data"]
    (tls_volume,) = [n for n, v in volumes.items() if "secret" in v]
    for cert in cfg["tls"]["certificates"]:
        assert {os.path.dirname(cert["cert"]), os.path.dirname(cert["key"])} == {mounts[tls_volume]["mountPath"]}
        assert {os.path.basename(cert["cert"]), os.path.basename(cert["key"])} == {"tls.crt", "tls.key"}
    assert os.path.dirname(server["pid_file"]) in {m["mountPath"] for m in mounts.values()}

    # Non-root, read-only, no capability unless a port under 1024 needs binding.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    wants_bind = any(port < 1024 for port in ports.values())
    assert ("NET_BIND_SERVICE" in context["capabilities"].get("add", [])) == wants_bind


def test_the_service_is_an_nlb_sending_the_proxy_protocol_to_local_pods():
    docs = manifests()
    _, cfg = configmap_config()
    service = docs["Service"]
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert all(lst["proxy_protocol"] for lst in cfg["listeners"])
    assert cfg["server"]["trusted_proxies"]
    # The NLB has taken the node out (unhealthy threshold x interval) before the listeners stop.
    notes = service["metadata"]["annotations"]
    taken_out = (int(notes["service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval"])
                 * int(notes["service.beta.kubernetes.io/aws-load-balancer-healthcheck-unhealthy-threshold"]))
    assert seconds(cfg["server"]["drain_delay"]) > taken_out
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


# -- deploy/Dockerfile ------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_slim_and_unprivileged():
    steps = dockerfile()
    bases = [args for word, args in steps if word == "FROM"]
    assert len(bases) == 2 and all("slim" in base for base in bases)
    assert "AS build" in bases[0]
    assert any(word == "COPY" and args.startswith("--from=build") for word, args in steps)
    # Everything the build stage copies exists in the repository (the context is its root).
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    (user,) = [args for word, args in steps if word == "USER"]
    assert int(user.split(":")[0]) > 0
    assert [w for w, _ in steps].index("USER") > max(i for i, (w, _) in enumerate(steps) if w == "RUN")


def test_dockerfile_entrypoint_runs_the_kubernetes_config_and_its_health_check_follows_the_drain(tmp_path):
    """ENTRYPOINT + CMD start fastlb on configmap.yaml's config (its mounts laid out under tmp_path,
    ports moved to free ones); HEALTHCHECK passes; a renewed TLS Secret is served without a restart;
    the pod's preStop starts the drain, and from then on HEALTHCHECK fails (503) while the listeners
    still serve."""
    steps = dict(dockerfile())
    entrypoint, cmd = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    assert entrypoint == ["fastlb"]
    check = steps["HEALTHCHECK"]
    health = json.loads(check[check.index("CMD") + 3:].strip())
    env_pairs = shlex.split(steps["ENV"])
    image_env = dict(pair.split("=", 1) for pair in env_pairs)

    text, cfg = configmap_config()
    config_path = Path(cmd[cmd.index("--config") + 1])
    mount = tmp_path / "mount"
    http, https, admin = free_port(), free_port(), free_port()
    for old, new in ((cfg["listeners"][0]["address"], f"127.0.0.1:{http}"),
                     (cfg["listeners"][1]["address"], f"127.0.0.1:{https}"),
                     (cfg["admin"]["address"], f"127.0.0.1:{admin}"),
                     ('trusted_proxies = ["10.0.0.0/8"]', 'trusted_proxies = ["127.0.0.0/8"]'),
                     ("/etc/fastlb/", f"{mount}/etc/fastlb/")):
        assert old in text
        text = text.replace(old, new)
    local_config = mount / config_path.relative_to("/")
    local_config.parent.mkdir(parents=True)
    local_config.write_text(text)
    # The TLS Secret, laid out as the kubelet mounts it, so that renewing it is a ..data swap.
    secret = cfg["tls"]["certificates"][0]
    tls_mount = MountedConfigMap(mount / os.path.dirname(secret["cert"]).lstrip("/"))
    ca = trustme.CA()

    def renew(name):
        issued = ca.issue_cert(name)
        tls_mount.update({os.path.basename(secret["cert"]): issued.cert_chain_pems[0].bytes().decode(),
                          os.path.basename(secret["key"]): issued.private_key_pem.bytes().decode()})

    def served_name():
        """The certificate the TLS listener serves, reached as the NLB would: PROXY header, then TLS."""
        context = ssl.create_default_context(cafile=None, cadata=ca.cert_pem.bytes().decode())
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", https), timeout=5) as raw:
            raw.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n")
            with context.wrap_socket(raw, server_hostname="site.example") as tls:
                cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)

    renew("one.example.com")

    pid_file = tmp_path / "fastlb.pid"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    env.update(image_env)
    assert image_env["FASTLB_SERVER_PID_FILE"] == cfg["server"]["pid_file"]
    env["FASTLB_SERVER_PID_FILE"] = str(pid_file)
    args = [a.replace("/etc/fastlb/", f"{mount}/etc/fastlb/") for a in cmd]
    health = [h.replace(":9900/", f":{admin}/") for h in health]
    assert health[0] == "python"
    health[0] = sys.executable
    proc = subprocess.Popen([sys.executable, "-m", "fastlb", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "ready:" not in line:
            line = proc.stderr.readline()
            assert line, "fastlb exited before it was ready"
        assert subprocess.run(health, timeout=10).returncode == 0
        assert served_name() == ["one.example.com"]
        renew("two.example.com")  # cert-manager renewed the Secret: [server] watch reloads
        while "reloaded: generation 1" not in line:
            line = proc.stderr.readline()
            assert line and "reload failed" not in line, line
        settles_on(served_name, ["two.example.com"])

        pre_stop = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
        command = [str(pid_file) if c == cfg["server"]["pid_file"] else c for c in pre_stop["preStop"]["exec"]["command"]]
        assert command[0] == "fastlb"
        assert run_fastlb(*command[1:], env=env).returncode == 0
        while "serving for drain_delay" not in line:
            line = proc.stderr.readline()
            assert line, "no drain"
        assert subprocess.run(health, timeout=10, stderr=subprocess.DEVNULL).returncode != 0
        with socket.create_connection(("127.0.0.1", http), timeout=5) as sock:  # still served
            sock.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 308 ")
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(15)


# -- deploy/systemd/fastlb.service ------------------------------------------------------------------------

UNIT = ROOT / "deploy" / "systemd" / "fastlb.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def fastlb_script() -> str | None:
    """The installed `fastlb` console script, which ExecStart names by absolute path."""
    return shutil.which("fastlb", path=os.path.dirname(sys.executable)) or shutil.which("fastlb")


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; tests/system-deps.sh)")
    script = fastlb_script()
    assert script, "fastlb is not installed: pip install ."
    unit = tmp_path / "fastlb.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/fastlb", script))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if "Failed to initialize manager" in done.stderr or "Failed to connect" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run in this container: {done.stderr.strip()}")
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "fastlb.service" in line]
    assert (done.returncode, ours) == (0, []), done.stdout + done.stderr


def test_systemd_unit_settings():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["all"]
    assert s["KillMode"] == ["mixed"]  # TERM to the master alone, or drain_delay is skipped
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"] == s["AmbientCapabilities"]
    assert int(s["LimitNOFILE"][0]) >= 65536
    assert s["User"] == ["fastlb"]
    assert s["ExecReload"][0].split()[1:] == ["reload"]
    # The default config's drain_delay (0) + graceful_timeout (30 s) fit in TimeoutStopSec.
    from fastlb.config import ServerSection

    assert int(s["TimeoutStopSec"][0]) > ServerSection().drain_delay + ServerSection().graceful_timeout


def test_systemd_unit_commands_speak_sd_notify(backends, tmp_path):
    """ExecStart under a NOTIFY_SOCKET the test owns: READY=1; ExecReload: RELOADING=1, READY=1 and
    exit 0; the TERM that `systemctl stop` sends: STOPPING=1."""
    (b1,) = backends("b1")
    s = unit_settings()
    exec_start = shlex.split(s["ExecStart"][0])
    exec_reload = shlex.split(s["ExecReload"][0])
    assert exec_start[0] == exec_reload[0] == "/usr/local/bin/fastlb"
    config = tmp_path / "fastlb.toml"
    config.write_text(f'[backends.b]\nservers = ["{b1.address}"]\n[[routes]]\nbackend = "b"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    for assignment in s["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value
    assert env["FASTLB_SERVER_PID_FILE"].startswith("/run/fastlb/")  # RuntimeDirectory=fastlb
    env["FASTLB_SERVER_PID_FILE"] = str(tmp_path / "fastlb.pid")
    env.update(FASTLB_LISTEN=f"127.0.0.1:{free_port()}", FASTLB_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
               FASTLB_WORKERS="1", NOTIFY_SOCKET=str(tmp_path / "notify"))
    args = [str(config) if a == "/etc/fastlb/fastlb.toml" else a for a in exec_start[1:]]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(env["NOTIFY_SOCKET"])
        manager.settimeout(20)

        def message():
            return dict(line.split("=", 1) for line in manager.recv(4096).decode().splitlines())

        proc = subprocess.Popen([sys.executable, "-m", "fastlb", *args], env=env, stderr=subprocess.DEVNULL)
        try:
            assert message()["READY"] == "1"
            reload = run_fastlb(*exec_reload[1:], env=env)
            assert reload.returncode == 0, reload.stderr
            assert message()["RELOADING"] == "1"
            assert message()["READY"] == "1"
            proc.send_signal(signal.SIGTERM)  # systemctl stop: KillSignal (TERM) to the main process
            assert message()["STOPPING"] == "1"
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
