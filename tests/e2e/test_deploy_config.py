"""Static (and where possible, live) checks of the deployment files: docker/, deploy/, config/.

No Docker engine or Kubernetes API exists on the test machine, so images are never built and
manifests never applied. Instead this test parses docker/compose.yaml, the Dockerfiles, every
manifest under deploy/k8s/ and the systemd unit, and checks them against the copilot-lb configs:
referenced files exist, ports agree with listen/admin addresses, probes hit real admin paths,
token env vars and token files are provided, TLS files are mounted from Secrets that hold them,
and every config (also the ConfigMaps' embedded ones) passes `copilot-lb check-config`. The
image's health-check script and the CLI image's entrypoint are run for real on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath

import pytest
import yaml

import harness
from conftest import run
from sdkutil import connected

pytestmark = pytest.mark.e2e

REPO = harness.REPO
DOCKER = REPO / "docker"
K8S = REPO / "deploy" / "k8s"
CONFIGS = sorted((REPO / "config").glob("*.yaml")) + [DOCKER / "copilot-lb.yaml"]
ADMIN_PATHS = {"/livez", "/readyz", "/metrics"}
CONTAINER_CONFIG = "/etc/copilot-lb/copilot-lb.yaml"


def lb_bin() -> Path:
    b = harness.proxy_bin()
    if not b.exists():
        pytest.fail(f"copilot-lb binary not found at {b} (cargo build, or set COPILOT_LB_BIN)")
    return b


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(lb_bin()), "check-config", str(path)], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def host_of(addr: str) -> str:
    return addr.rsplit(":", 1)[0].strip("[]")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d["__file__"] = f.name
                docs.append(d)
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_passes_check_config(path):
    p = check_config(path)
    assert p.returncode == 0, f"copilot-lb check-config {path}:\n{p.stdout}{p.stderr}"
    assert ": ok (" in p.stdout, p.stdout


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_sidecar(cfg: dict) -> bool:
    """A sidecar config: a tcp byte pipe, or a jsonrpc proxy whose backends are all edges."""
    bs = cfg.get("backends") or []
    return all(l.get("mode") == "tcp" for l in cfg["listeners"]) or (bs and all(b.get("edge") for b in bs))


def edge_requires_client_certs():
    edge = load_yaml(REPO / "config" / "edge.yaml")
    etls = edge["listeners"][0]["tls"]
    assert etls["client_auth"] == "required" and etls["client_ca"]
    assert all(t.get("identities") for t in edge.get("tenants", [])), "edge tenants identify by client cert"


def test_sidecar_config_is_loopback_jsonrpc_with_mtls_edge_backends():
    cfg = load_yaml(REPO / "config" / "sidecar.yaml")
    (lst,) = cfg["listeners"]
    assert lst.get("mode", "jsonrpc") == "jsonrpc", "the shipped sidecar is the session-aware one"
    assert host_of(lst["listen"]) in LOOPBACK and not lst.get("allow_non_loopback", False)
    assert "upstream" not in lst and "tls" not in lst
    assert len(cfg["backends"]) >= 2, "a sidecar needs another edge to move its sessions to"
    for b in cfg["backends"]:
        assert b.get("edge") is True, f"backend {b['name']}: not an edge"
        tls = b.get("tls") or {}
        assert tls.get("cert") and tls.get("key") and tls.get("ca"), f"{b['name']}: sidecar -> edge must be mutual TLS"
        assert b.get("token_env"), f"{b['name']}: no tenant token"
    assert cfg["sessions"]["shared_storage"] is True and cfg["sessions"]["failover"] == "reassign"
    assert cfg["state"]["kind"] == "memory", "a sidecar keeps its app's sessions in memory only"
    assert host_of(cfg["admin"]["listen"]) in LOOPBACK
    edge_requires_client_certs()


def test_tcp_sidecar_config_is_loopback_byte_pipe_with_mtls():
    path = REPO / "config" / "sidecar-tcp.yaml"
    p = check_config(path)
    assert p.returncode == 0 and ": ok (1 listener(s), 0 backend(s))" in p.stdout, f"{p.stdout}{p.stderr}"
    cfg = load_yaml(path)
    (lst,) = cfg["listeners"]
    assert lst["mode"] == "tcp" and host_of(lst["listen"]) in LOOPBACK
    assert not lst.get("allow_non_loopback", False)
    tls = lst["upstream"]["tls"]
    assert tls["cert"] and tls["key"] and tls["ca"], "sidecar -> edge must be mutual TLS"
    assert not cfg.get("backends")
    # the same app-side contract as the session-aware sidecar: either can replace the other
    side = load_yaml(REPO / "config" / "sidecar.yaml")
    assert lst["listen"] == side["listeners"][0]["listen"] and cfg["admin"] == side["admin"]
    assert {tls["ca"], tls["cert"], tls["key"]} == {side["backends"][0]["tls"][k] for k in ("ca", "cert", "key")}
    edge_requires_client_certs()


def tenant_accepts(t: dict, token: bool) -> bool:
    """src/auth.rs: a tenant with identities and no token hashes takes a certificate alone, and
    a connect that also carries a token matches only a tenant that lists the token's hash."""
    return bool(t.get("token_hashes")) if token else not t.get("token_hashes")


class RefusedCredentials(AssertionError):
    """The edge would answer the sidecar's connect with AUTHENTICATION_FAILED."""


def test_edge_accepts_the_sidecars_credentials():
    side = load_yaml(REPO / "config" / "sidecar.yaml")
    edge = load_yaml(REPO / "config" / "edge.yaml")
    # the identity is the client certificate's URI SAN, named beside its path in the sidecar config
    m = re.search(r"URI SAN (spiffe://[\w/.-]*\w)", (REPO / "config" / "sidecar.yaml").read_text())
    identity = m.group(1)
    tenants = [t for t in edge["tenants"] if any(re.fullmatch(re.escape(i).replace(r"\*", ".*"), identity)
                                                 for i in t.get("identities", []))]
    assert tenants, f"no edge tenant matches the sidecar's identity {identity}"
    for b in side["backends"]:
        if not any(tenant_accepts(t, bool(b.get("token_env"))) for t in tenants):
            raise RefusedCredentials(f"backend {b['name']}: edge tenants {[t['name'] for t in tenants]} "
                                     f"refuse its credentials (token: {bool(b.get('token_env'))})")


# ------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources(rest: str) -> list[str]:
    parts = [p for p in shlex.split(rest) if not p.startswith("--")]
    return parts[:-1]


DOCKERFILES = {  # dockerfile -> build context (as docker/compose.yaml builds them)
    DOCKER / "Dockerfile": REPO,
    DOCKER / "cli.Dockerfile": DOCKER,
    REPO / "examples" / "express-api" / "Dockerfile": REPO / "examples",
}


@pytest.mark.parametrize("dockerfile", list(DOCKERFILES), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_sources_exist_and_runtime_is_non_root(dockerfile):
    ctx = DOCKERFILES[dockerfile]
    ins = dockerfile_instructions(dockerfile)
    for word, rest in ins:
        if word in ("COPY", "ADD") and "--from=" not in rest:
            for src in copy_sources(rest):
                assert (ctx / src).exists(), f"{dockerfile.name}: COPY source {src} missing in context {ctx}"
    # the last stage runs as a non-root user
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    users = [r for w, r in ins[last_from:] if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: runs as root"
    assert any(w == "HEALTHCHECK" for w, _ in ins), f"{dockerfile.name}: no HEALTHCHECK"


def test_copilot_lb_dockerfile():
    ins = dockerfile_instructions(DOCKER / "Dockerfile")
    assert sum(w == "FROM" for w, _ in ins) >= 2, "multi-stage build expected"
    env = " ".join(r for w, r in ins if w == "ENV")
    assert f"COPILOT_LB_CONFIG={CONTAINER_CONFIG}" in env
    hc = next(r for w, r in ins if w == "HEALTHCHECK")
    assert "copilot-lb-healthcheck" in hc and "/livez" in hc
    assert any(w == "COPY" and "docker/healthcheck.sh" in r and "copilot-lb-healthcheck" in r for w, r in ins)
    assert any(w == "ENTRYPOINT" and "copilot-lb" in r for w, r in ins)


def test_cli_dockerfile():
    ins = dockerfile_instructions(DOCKER / "cli.Dockerfile")
    text = (DOCKER / "cli.Dockerfile").read_text()
    pin = (REPO / "tests" / "e2e" / "install.sh").read_text()
    version = re.search(r"^CLI_VERSION=(\S+)", pin, re.M).group(1)
    assert f"ARG COPILOT_CLI_VERSION={version}" in text, "CLI image must pin the tested CLI version"
    assert '"@github/copilot@${COPILOT_CLI_VERSION}"' in text
    assert any(w == "ENTRYPOINT" and "copilot-cli-entrypoint" in r for w, r in ins)
    entry = (DOCKER / "cli-entrypoint.sh").read_text()
    assert "--headless" in entry and "--no-auto-update" in entry and "COPILOT_CONNECTION_TOKEN" in entry


# ------------------------------------------------------------------------------------------
# docker/compose.yaml
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    return load_yaml(DOCKER / "compose.yaml")


def compose_env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_builds_and_mounts_exist(compose):
    for name, svc in compose["services"].items():
        b = svc.get("build")
        if b:
            ctx = (DOCKER / b["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx} missing"
            df = ctx / b.get("dockerfile", "Dockerfile")
            assert df.is_file(), f"{name}: {df} missing"
            assert df.resolve() in {p.resolve() for p in DOCKERFILES}, f"{name}: unchecked Dockerfile {df}"
            assert DOCKERFILES[next(p for p in DOCKERFILES if p.resolve() == df.resolve())].resolve() == ctx
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith((".", "/")):
                assert (DOCKER / src).exists(), f"{name}: bind mount source {src} missing"
            else:
                assert src in (compose.get("volumes") or {}), f"{name}: volume {src} not declared"
        for s in svc.get("secrets", []):
            s = s if isinstance(s, str) else s["source"]
            assert s in (compose.get("secrets") or {}), f"{name}: secret {s} not declared"


def test_compose_matches_the_proxy_config(compose):
    svcs = compose["services"]
    lb = svcs["copilot-lb"]
    mount = next(v for v in lb["volumes"] if v.split(":")[1] == CONTAINER_CONFIG)
    cfg_path = (DOCKER / mount.split(":")[0]).resolve()
    assert cfg_path == (DOCKER / "copilot-lb.yaml").resolve()
    cfg = load_yaml(cfg_path)
    listen_port = port_of(cfg["listeners"][0]["listen"])
    admin_port = port_of(cfg["admin"]["listen"])
    published = {int(p.split(":")[-1]) for p in lb.get("ports", [])}
    assert {listen_port, admin_port} <= published, f"copilot-lb publishes {published}"
    for p in lb.get("ports", []):
        assert p.startswith("127.0.0.1:"), f"publish on loopback only: {p}"
    # health check hits the real admin endpoint, on the configured admin port
    hc = lb["healthcheck"]["test"]
    assert "copilot-lb-healthcheck" in hc and any(a in ADMIN_PATHS for a in hc)
    assert admin_port == 9464 or any(str(admin_port) in a for a in hc)
    # every backend is a CLI service on its port, with the token copilot-lb expects
    secrets_in_lb = {s if isinstance(s, str) else s["source"] for s in lb.get("secrets", [])}
    for b in cfg["backends"]:
        host, port = host_of(b["address"]), port_of(b["address"])
        assert host in svcs, f"backend {b['name']}: no compose service {host}"
        cli = svcs[host]
        env = compose_env(cli)
        assert int(env.get("COPILOT_PORT", 4321)) == port
        if "token_file" in b:
            f = PurePosixPath(b["token_file"])
            assert f.parent == PurePosixPath("/run/secrets") and f.name in secrets_in_lb, \
                f"backend {b['name']}: token_file {f} is not a secret mounted into copilot-lb"
            # the CLI reads the same secret as its COPILOT_CONNECTION_TOKEN
            assert env.get("COPILOT_CONNECTION_TOKEN_FILE") == str(f)
            assert f.name in {s if isinstance(s, str) else s["source"] for s in cli.get("secrets", [])}
        if "token_env" in b:
            assert b["token_env"] in compose_env(lb), f"backend {b['name']}: {b['token_env']} not set"
    # shared session state: every CLI mounts the same named volume at its session-state dir
    cli_svcs = [svcs[host_of(b["address"])] for b in cfg["backends"]]
    mounts = {tuple(v for v in s["volumes"] if v.endswith("/.copilot/session-state")) for s in cli_svcs}
    assert len(mounts) == 1 and all(mounts), f"CLIs must share one session-state volume: {mounts}"
    assert cfg["sessions"]["shared_storage"] is True
    # the example app dials the proxy's listener
    app = svcs["express-api"]
    url = compose_env(app)["COPILOT_CLI_URL"]
    assert host_of(url) == "copilot-lb" and port_of(url) == listen_port
    assert int(compose_env(app)["PORT"]) in {int(p.split(":")[-1]) for p in app["ports"]}


# ------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs():
    return k8s_docs()


def embedded_configs(docs) -> dict[str, str]:
    return {name: cm["data"]["copilot-lb.yaml"] for name, cm in by_kind(docs, "ConfigMap").items()
            if "copilot-lb.yaml" in cm.get("data", {})}


def test_k8s_files_parse_and_kustomization_lists_them(docs):
    kust = load_yaml(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"kustomization resources {listed} vs files {present}"
    for d in docs:
        if d["__file__"] != "kustomization.yaml":
            assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d["__file__"]
    if shutil.which("kubectl"):
        p = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, f"kubectl kustomize deploy/k8s:\n{p.stderr}"


def test_k8s_configmaps_are_the_config_files_and_pass_check_config(docs, tmp_path):
    emb = embedded_configs(docs)
    assert emb.get("copilot-lb-edge-config") == (REPO / "config" / "edge.yaml").read_text()
    assert emb.get("example-app-sidecar-config") == (REPO / "config" / "sidecar.yaml").read_text()
    for name, text in emb.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        p = check_config(f)
        assert p.returncode == 0, f"ConfigMap {name}: copilot-lb check-config:\n{p.stdout}{p.stderr}"


def copilot_lb_containers(docs):
    """(workload, container, config dict) for every container that runs copilot-lb."""
    cms = {n: yaml.safe_load(t) for n, t in embedded_configs(docs).items()}
    out = []
    for wl in list(by_kind(docs, "Deployment").values()) + list(by_kind(docs, "StatefulSet").values()):
        spec = pod_spec(wl)
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in all_containers(spec):
            if c["image"] != "copilot-lb":
                continue
            cfg_mount = next(m for m in c["volumeMounts"] if m["mountPath"] in ("/etc/copilot-lb", CONTAINER_CONFIG))
            cm = vols[cfg_mount["name"]]["configMap"]["name"]
            out.append((wl, c, cms[cm]))
    return out


def edge_workload(docs) -> dict:
    return by_kind(docs, "StatefulSet")["copilot-lb-edge"]


def test_k8s_edge_statefulset(docs):
    assert "copilot-lb-edge" not in by_kind(docs, "Deployment"), "the edge is a StatefulSet now"
    edge = edge_workload(docs)
    assert edge["spec"]["replicas"] >= 2
    labels = edge["spec"]["template"]["metadata"]["labels"]
    assert edge["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget").values()
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert pdbs, "no PodDisruptionBudget selects the edge pods"
    assert all("minAvailable" in p["spec"] or "maxUnavailable" in p["spec"] for p in pdbs)
    assert all(p["spec"].get("minAvailable", 0) < edge["spec"]["replicas"] for p in pdbs), "PDB blocks every eviction"
    svcs = by_kind(docs, "Service")
    # direct clients: the ClusterIP Service
    svc = svcs["copilot-lb-edge"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"].get("clusterIP") != "None"
    # sidecars: per-pod DNS names, only for Ready pods
    headless = svcs[edge["spec"]["serviceName"]]
    assert headless["metadata"]["name"] == "copilot-lb-edge-pods"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses") is False
    assert headless["spec"]["selector"].items() <= labels.items()
    # one pod at a time, each confirmed by the sidecars' health checks before the next goes
    assert edge["spec"].get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    side = load_yaml(REPO / "config" / "sidecar.yaml")
    h = side["health"]
    confirm = h["rise"] * int(h["interval"].rstrip("s")) + int(h["timeout"].rstrip("s"))
    assert edge["spec"].get("minReadySeconds", 0) >= confirm, "next edge stops before sidecars confirm the new one"
    # drain: preStop pause + shutdown_timeout fit in the grace period; readiness turns 503 on SIGTERM
    spec = pod_spec(edge)
    (c,) = spec["containers"]
    cfg = load_yaml(REPO / "config" / "edge.yaml")
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > int(cfg["limits"]["shutdown_timeout"].rstrip("s")) + pause
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert not edge["spec"].get("volumeClaimTemplates"), "the edge keeps no local state"


def test_k8s_ports_probes_env_and_mounts(docs):
    secrets = by_kind(docs, "Secret")
    found = copilot_lb_containers(docs)
    assert {wl["metadata"]["name"] for wl, _, _ in found} == {"copilot-lb-edge", "example-app"}
    for wl, c, cfg in found:
        where = f"{wl['metadata']['name']}/{c['name']}"
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        admin = cfg["admin"]["listen"]
        args = c.get("args", [])
        assert "serve" in args, f"{where}: args {args}"
        if "--config" in args:
            assert args[args.index("--config") + 1] == CONTAINER_CONFIG, f"{where}: args {args}"
        # listeners reachable from outside the pod are declared container ports; sidecars stay loopback
        for lst in cfg["listeners"]:
            if host_of(lst["listen"]) in LOOPBACK:
                assert is_sidecar(cfg), f"{where}: a loopback listener that is not a sidecar is unreachable"
            else:
                assert port_of(lst["listen"]) in ports.values(), f"{where}: listener port not declared"
        # probes: liveness and readiness (or startup) on real admin paths of THIS config's admin address
        probes = {k: c[k] for k in ("livenessProbe", "readinessProbe", "startupProbe") if k in c}
        assert "livenessProbe" in probes and ({"readinessProbe", "startupProbe"} & probes.keys()), where
        for kind, pr in probes.items():
            if "httpGet" in pr:
                assert host_of(admin) in ("0.0.0.0", "::"), f"{where}: httpGet probe but admin on {admin}"
                port = pr["httpGet"]["port"]
                port = ports[port] if isinstance(port, str) else port
                assert port == port_of(admin), f"{where} {kind}: port {port} != admin {admin}"
                assert pr["httpGet"]["path"] in {"/livez", "/readyz"}, f"{where} {kind}"
            else:
                cmd = pr["exec"]["command"]
                assert cmd[0] == "copilot-lb-healthcheck" and cmd[1] in {"/livez", "/readyz"}, f"{where} {kind}"
                assert cmd[2] == admin, f"{where} {kind}: probes {cmd[2]}, admin is {admin}"
        if "readinessProbe" in c and "httpGet" in c["readinessProbe"]:
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # token_env comes from a Secret key that exists
        env = {e["name"]: e for e in c.get("env", [])}
        for b in cfg.get("backends", []):
            if "token_env" in b:
                e = env.get(b["token_env"])
                assert e, f"{where}: {b['token_env']} (backend {b['name']}) not in env"
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{where}: secret {ref}"
        # every TLS file named in the config is a key of a Secret mounted at its directory
        vols = {v["name"]: v for v in pod_spec(wl).get("volumes", [])}
        mounts = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}
        tls_files = []
        for lst in cfg["listeners"]:
            t = lst.get("tls") or {}
            tls_files += [t.get("cert"), t.get("key"), t.get("client_ca")]
            u = (lst.get("upstream") or {}).get("tls") or {}
            tls_files += [u.get("ca"), u.get("cert"), u.get("key")]
        for b in cfg.get("backends", []):
            t = b.get("tls") or {}
            tls_files += [t.get("ca"), t.get("cert"), t.get("key")]
        for f in filter(None, tls_files):
            f = PurePosixPath(f)
            vol = mounts.get(str(f.parent))
            assert vol and "secret" in vol, f"{where}: {f.parent} is not a mounted Secret"
            assert f.name in secrets[vol["secret"]["secretName"]]["stringData"], f"{where}: {f} not in secret"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_backends_and_sidecar_upstream(docs):
    cms = {n: yaml.safe_load(t) for n, t in embedded_configs(docs).items()}
    edge = cms["copilot-lb-edge-config"]
    sts = by_kind(docs, "StatefulSet")["copilot-cli"]
    svcs = by_kind(docs, "Service")
    headless = svcs[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    cli = pod_spec(sts)["containers"][0]
    cli_port = next(p["containerPort"] for p in cli["ports"])
    names = {f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(sts["spec"]["replicas"])}
    got = {host_of(b["address"]) for b in edge["backends"]}
    assert got == names, f"edge backends {got} vs StatefulSet pods {names}"
    assert all(port_of(b["address"]) == cli_port for b in edge["backends"])
    # the CLI gets the same Secret as its connection token that the edge sends
    env = {e["name"]: e for e in cli["env"]}
    token_file = PurePosixPath(env["COPILOT_CONNECTION_TOKEN_FILE"]["value"])
    vols = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    m = next(m for m in cli["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    edge_c = pod_spec(edge_workload(docs))["containers"][0]
    edge_ref = next(e for e in edge_c["env"] if e["name"] == edge["backends"][0]["token_env"])
    assert vols[m["name"]]["secret"]["secretName"] == edge_ref["valueFrom"]["secretKeyRef"]["name"]
    assert token_file.name == edge_ref["valueFrom"]["secretKeyRef"]["key"]
    # shared session state on one RWX claim
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    ss = next(m for m in cli["volumeMounts"] if m["mountPath"].endswith("/.copilot/session-state"))
    claim = vols[ss["name"]]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]
    assert edge["sessions"]["shared_storage"] is True
    # the edge pods' client port is the edge's listener port, on both its Services
    ests = edge_workload(docs)
    edge_listen = port_of(edge["listeners"][0]["listen"])
    (edge_c,) = pod_spec(ests)["containers"]
    assert {p["name"]: p["containerPort"] for p in edge_c["ports"]}["client"] == edge_listen
    for name in ("copilot-lb-edge", ests["spec"]["serviceName"]):
        assert {p["targetPort"] for p in svcs[name]["spec"]["ports"]} <= {"client", edge_listen}, name
    # the session-aware sidecar lists every edge pod by its stable DNS name, on the edge's port
    side_cfg = cms["example-app-sidecar-config"]
    side = side_cfg["listeners"][0]
    headless_e = svcs[ests["spec"]["serviceName"]]
    pods = {f"{ests['metadata']['name']}-{i}.{headless_e['metadata']['name']}" for i in range(ests["spec"]["replicas"])}
    got = [host_of(b["address"]) for b in side_cfg["backends"]]
    assert sorted(got) == sorted(pods), f"sidecar backends {got} vs edge StatefulSet pods {pods}"
    assert all(port_of(b["address"]) == edge_listen for b in side_cfg["backends"])
    assert all(port_of(b["address"]) in {p["port"] for p in headless_e["spec"]["ports"]} for b in side_cfg["backends"])
    # ... verifying the name all edge replicas share (the ClusterIP Service's, the certificate's SAN)
    assert {b["tls"]["server_name"] for b in side_cfg["backends"]} == {"copilot-lb-edge"}
    # the byte-pipe sidecar dials the edge ClusterIP Service on its port
    tcp = load_yaml(REPO / "config" / "sidecar-tcp.yaml")["listeners"][0]
    up = tcp["upstream"]["address"]
    esvc = svcs[host_of(up)]
    assert esvc["spec"].get("clusterIP") != "None"
    assert port_of(up) in {p["port"] for p in esvc["spec"]["ports"]}
    assert tcp["upstream"]["tls"]["server_name"] == esvc["metadata"]["name"]
    # the app dials the sidecar, a native sidecar that sends the tenant token from a Secret
    app_pod = pod_spec(by_kind(docs, "Deployment")["example-app"])
    sidecar = next(c for c in app_pod["initContainers"] if c["image"] == "copilot-lb")
    assert sidecar.get("restartPolicy") == "Always", "native sidecar expected"
    senv = {e["name"]: e for e in sidecar["env"]}
    secrets = by_kind(docs, "Secret")
    for b in side_cfg["backends"]:
        assert b.get("edge") is True and b.get("token_env"), b["name"]
        ref = senv[b["token_env"]]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]["stringData"], f"{b['name']}: secret {ref}"
        assert not ref.get("optional"), "the sidecar must not start without its tenant token"
    # /readyz is meaningful for a sidecar with edge backends: it gates the app's start and the pod
    assert sidecar["startupProbe"]["exec"]["command"][1] == "/readyz"
    assert sidecar["readinessProbe"]["exec"]["command"][1] == "/readyz"
    assert sidecar["livenessProbe"]["exec"]["command"][1] == "/livez"
    app = next(c for c in app_pod["containers"] if c["name"] == "app")
    aenv = {e["name"]: e for e in app["env"]}
    assert aenv["COPILOT_CLI_URL"].get("value") == side["listen"]
    assert "COPILOT_LB_TENANT_TOKEN" not in aenv, "the app never sees the tenant token"
    assert app["readinessProbe"]["httpGet"]["path"] == "/healthz"


def selects(selector: dict | None, labels: dict) -> bool:
    sel = selector or {}
    assert not sel.get("matchExpressions"), "only matchLabels is modelled"
    return (sel.get("matchLabels") or {}).items() <= labels.items()


def test_k8s_network_policy_lets_the_app_reach_every_edge_pod(docs):
    """The sidecar dials edge pods directly (headless Service): every NetworkPolicy that selects
    the edge pods must admit the app pods on the edge's port (same namespace)."""
    edge_labels = edge_workload(docs)["spec"]["template"]["metadata"]["labels"]
    app_labels = by_kind(docs, "Deployment")["example-app"]["spec"]["template"]["metadata"]["labels"]
    port = port_of(load_yaml(REPO / "config" / "edge.yaml")["listeners"][0]["listen"])
    pols = [p for p in by_kind(docs, "NetworkPolicy").values()
            if selects(p["spec"]["podSelector"], edge_labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    assert pols, "no NetworkPolicy guards the edge pods"

    def admits(rule) -> bool:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (port, "client") for p in ports):
            return False
        peers = rule.get("from")
        if not peers:
            return True
        return any("ipBlock" not in peer and selects(peer.get("podSelector"), app_labels)
                   and ("namespaceSelector" not in peer or selects(peer["namespaceSelector"], {}))
                   for peer in peers)
    allowed = [r for p in pols for r in p["spec"].get("ingress", []) if admits(r)]
    assert allowed, f"no ingress rule admits {app_labels} to the edge pods on {port}"
    # the CLIs and Redis still admit the edge pods, whatever controller made them
    for name in ("copilot-cli", "copilot-lb-redis"):
        rules = by_kind(docs, "NetworkPolicy")[name]["spec"]["ingress"]
        assert any(selects(peer.get("podSelector"), edge_labels) for r in rules for peer in r.get("from", [])), name


# ------------------------------------------------------------------------------------------
# systemd
# ------------------------------------------------------------------------------------------
def test_systemd_unit(tmp_path):
    unit = REPO / "deploy" / "systemd" / "copilot-lb.service"
    kv: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, v = line.split("=", 1)
            kv.setdefault(k.strip(), []).append(v.strip())
    one = {k: v[-1] for k, v in kv.items()}
    for k, want in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                    "CapabilityBoundingSet": "", "KillSignal": "SIGTERM", "ProtectHome": "yes"}.items():
        assert one.get(k) == want, f"{k}={one.get(k)!r}, want {want!r}"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["ExecStart"] == f"/usr/local/bin/copilot-lb serve --config {CONTAINER_CONFIG}"
    assert one.get("User") and one["User"] != "root"
    if shutil.which("systemd-analyze"):
        local = tmp_path / "copilot-lb.service"
        local.write_text(unit.read_text().replace("/usr/local/bin/copilot-lb", str(lb_bin())))
        p = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and not p.stderr.strip(), f"systemd-analyze verify:\n{p.stderr}"


# ------------------------------------------------------------------------------------------
# docs
# ------------------------------------------------------------------------------------------
def test_deploy_doc_references_exist():
    doc = (REPO / "docs" / "deploy.md").read_text()
    refs = set(re.findall(r"(?<![\w/.-])((?:docker|deploy|config|examples|tests)/[\w./-]*\w)", doc))
    assert refs, "docs/deploy.md names no repository files"
    made_by_install = {"examples/node_modules"}
    missing = sorted(r for r in refs - made_by_install if not (REPO / r).exists())
    assert not missing, f"docs/deploy.md references missing files: {missing}"


# ------------------------------------------------------------------------------------------
# live: the image's health check script and the CLI image's entrypoint, on 127.0.0.1
# ------------------------------------------------------------------------------------------
def test_healthcheck_script_against_real_proxy(tmp_path):
    port, admin = harness.free_port(), harness.free_port()
    dead = harness.free_port()
    proc = harness.Proc("copilot-lb-hc", [lb_bin(), "serve", "--config", DOCKER / "copilot-lb.yaml",
                                          "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                                          "--backend", f"127.0.0.1:{dead}"],
                        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path,
                        log_path=tmp_path / "copilot-lb.log")
    try:
        proc.wait_port(admin, 20)

        def hc(*args, env=None):
            return subprocess.run(["bash", str(DOCKER / "healthcheck.sh"), *args], capture_output=True,
                                  text=True, timeout=15, stdin=subprocess.DEVNULL,
                                  env={"PATH": "/usr/bin:/bin", **(env or {})})
        assert hc("/livez", f"127.0.0.1:{admin}").returncode == 0
        assert hc(env={"COPILOT_LB_ADMIN": f"127.0.0.1:{admin}"}).returncode == 0  # image defaults
        # the only backend is down: /readyz turns 503 once health checks mark it down
        deadline = time.monotonic() + 20
        while (r := hc("/readyz", f"127.0.0.1:{admin}")).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.returncode == 1 and "503" in r.stderr, r.stderr
        assert hc("/nope", f"127.0.0.1:{admin}").returncode == 1
        assert hc("/livez", f"127.0.0.1:{dead}").returncode == 1
    finally:
        proc.stop()


def test_cli_entrypoint_runs_headless_with_token_file(tmp_path, e2e_install):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "copilot").symlink_to(harness.COPILOT_BIN)
    token = "entrypoint-" + os.urandom(8).hex()
    (tmp_path / "token").write_text(token + "\n")
    port = harness.free_port()
    home = tmp_path / "home"
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home),
           "COPILOT_HOME": str(home / ".copilot"), "COPILOT_CACHE_HOME": str(harness.CACHE_DIR),
           "COPILOT_AUTO_UPDATE": "false", "NO_COLOR": "1", "COPILOT_HOST": "127.0.0.1",
           "COPILOT_PORT": str(port)}
    # without a token it refuses to start
    p = subprocess.run(["sh", str(DOCKER / "cli-entrypoint.sh")], env=env, capture_output=True, text=True,
                       timeout=20, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "COPILOT_CONNECTION_TOKEN" in p.stderr
    proc = harness.Proc("cli-entrypoint", ["sh", DOCKER / "cli-entrypoint.sh"],
                        env={**env, "COPILOT_CONNECTION_TOKEN_FILE": str(tmp_path / "token")},
                        cwd=tmp_path, log_path=tmp_path / "cli.log")
    try:
        proc.wait_port(port, 60)
        assert (home / ".copilot" / "session-state").is_dir()

        async def status(tok):
            async with connected(f"127.0.0.1:{port}", token=tok, fast_close=True) as c:
                return await asyncio.wait_for(c.get_status(), 20)

        assert run(status(token), timeout=40).version
        with pytest.raises(Exception):
            run(status("wrong-token"), timeout=40)
    finally:
        proc.stop()
