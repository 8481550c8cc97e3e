"""The shipped Kubernetes manifest, run: the daemon started with exactly the
environment Kubernetes gives a pod of it, computed from the manifest by the
kubelet's rules (``pkg/kubelet/envvars``: service links for every Service of the
namespace unless ``enableServiceLinks: false``, the API server's always), and the
same for a manifest of a user's own that leaves service links on beside a Service
named ``ebbcast``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml

from helpers import REPO, dial, http_json, metric, recv_frame, wait_for

MANIFEST = REPO / "deploy" / "kubernetes" / "ebbcast.yaml"
#: The API server's Service, whose variables every pod gets.
API_SERVER = {"kind": "Service", "metadata": {"name": "kubernetes"},
              "spec": {"ports": [{"name": "https", "port": 443}]}}
#: The Secret the manifest reads (it is optional: this one has the token).
SECRETS = {"ebbcast": {"admin-token": "token-from-the-k8s-secret"}}


def documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def env_name(name: str) -> str:
    return name.replace("-", "_").upper()


def service_links(service: dict[str, Any], cluster_ip: str) -> dict[str, str]:
    """The variables the kubelet sets for one Service: its host and first port, each
    named port, and the Docker-link ones (the first port also as ``<NAME>_PORT``)."""
    name, ports = env_name(service["metadata"]["name"]), service["spec"]["ports"]
    links = {f"{name}_SERVICE_HOST": cluster_ip, f"{name}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            links[f"{name}_SERVICE_PORT_{env_name(port['name'])}"] = str(port["port"])
    for index, port in enumerate(ports):
        protocol = port.get("protocol", "TCP")
        address = f"{protocol.lower()}://{cluster_ip}:{port['port']}"
        if index == 0:
            links[f"{name}_PORT"] = address
        each = f"{name}_PORT_{port['port']}_{protocol.upper()}"
        links.update({each: address, f"{each}_PROTO": protocol.lower(),
                      f"{each}_PORT": str(port["port"]), f"{each}_ADDR": cluster_ip})
    return links


def pod_environment(manifest: list[dict[str, Any]]) -> dict[str, str]:
    """What the ebbcast container of ``manifest``'s ebbcast Deployment starts with."""
    (deployment,) = [d for d in manifest if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "ebbcast"]
    pod = deployment["spec"]["template"]["spec"]
    services = [API_SERVER]
    if pod.get("enableServiceLinks", True):
        services += [d for d in manifest if d["kind"] == "Service"]
    env = {"HOSTNAME": "ebbcast-7c9d5b6f4d-x2x9q"}
    for number, service in enumerate(services, 1):
        env.update(service_links(service, f"10.96.0.{number}"))
    (container,) = pod["containers"]
    for var in container["env"]:  # the container's own win over service links
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SECRETS[ref["name"]][ref["key"]]
    return env


def in_this_test(env: dict[str, str], redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The two values only a cluster has: its Redis' DNS name, and the pod's
    ``emptyDir`` (which a test cannot create at /run/ebbcast)."""
    assert env["EBBCAST_BACKPLANE_URL"] == "redis://ebbcast-redis:6379/0"
    (tmp_path / "run").mkdir()
    return {**env, "EBBCAST_BACKPLANE_URL": redis_url, "RUNTIME_DIRECTORY": str(tmp_path / "run")}


def free_ports(tmp_path: Path) -> str:
    """A config file binding both listeners to port 0: the environment is the pod's,
    and a file, below it, is the one way to give a test its own ports without
    overriding what the pod's variables say."""
    path = tmp_path / "ports.toml"
    path.write_text("[server]\nport = 0\n[admin]\nport = 0\n")
    return str(path)


def serves(d: Any) -> None:
    """A client connects, the Secret's admin token broadcasts to it over the Redis
    backplane, and SIGTERM drains to exit 0."""
    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    ws = dial(d.ws_url)
    recv_frame(ws, "welcome")
    status, _ = http_json(d.admin_url + "/broadcast", "POST", b"hello pod",
                          SECRETS["ebbcast"]["admin-token"])
    assert status == 202
    assert recv_frame(ws)["text"] == "hello pod"
    ws.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_the_shipped_manifest_starts_the_daemon_with_its_pod_environment(
        spawn: Any, redis_server: Any, tmp_path: Path) -> None:
    env = pod_environment(documents())
    # service links are off: only the API server's are there
    assert not [var for var in env if var.startswith("EBBCAST_") and "_PORT_" in var]
    assert env["KUBERNETES_PORT"] == "tcp://10.96.0.1:443"
    d = spawn("--config", free_ports(tmp_path), env=in_this_test(env, redis_server.url, tmp_path))
    assert "service links" not in d.log_text()
    serves(d)


def test_a_service_named_ebbcast_with_service_links_on_does_not_stop_the_daemon(
        spawn: Any, redis_server: Any, tmp_path: Path) -> None:
    """A user's own manifest, without ``enableServiceLinks: false``: every Service
    named ebbcast-something gives the pod EBBCAST_ variables, some of them the very
    names of settings (EBBCAST_ADMIN_PORT=tcp://10.96.0.3:8001)."""
    manifest = documents()
    for doc in manifest:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"].pop("enableServiceLinks")
    env = pod_environment(manifest)
    assert env["EBBCAST_SERVICE_HOST"] == "10.96.0.2"
    assert env["EBBCAST_ADMIN_PORT"] == "tcp://10.96.0.3:8001"
    assert env["EBBCAST_REDIS_PORT_6379_TCP_ADDR"] == "10.96.0.4"
    d = spawn("--config", free_ports(tmp_path), env=in_this_test(env, redis_server.url, tmp_path))
    line = d.wait_for_log(r"ignored (\d+) environment variables Kubernetes sets for its "
                          r"Services \(service links\): ([^;]*);")
    named = line.group(2).split(", ")
    links = sorted(var for var in env if var.startswith("EBBCAST_") and
                   ("_SERVICE_" in var or var.endswith("_PORT") or "_PORT_" in var))
    assert named == links and int(line.group(1)) == len(links)
    assert not d.admin_url.endswith(":8001")  # the file's port 0, not the link's
    assert d.log_text().count("service links") == 1  # said once
    serves(d)


def test_a_runtime_directory_that_is_not_there_is_said_and_replaced(
        spawn: Any, tmp_path: Path) -> None:
    """The pod's RUNTIME_DIRECTORY is a volume; run without it (a manifest of one's
    own, a test with the pod's environment) the daemon says so and uses the system's
    temporary directory, which it cleans up at exit."""
    import tempfile

    missing = tmp_path / "not-mounted"
    temporary = Path(tempfile.gettempdir())
    before = set(temporary.glob("ebbcast-*"))
    d = spawn("--port", "0", "--admin-port", "0", "--workers", "2",
              env={"RUNTIME_DIRECTORY": str(missing)})
    line = d.wait_for_log(r"RUNTIME_DIRECTORY \S+ cannot be used \(No such file or "
                          r"directory\): using (\S+) instead")
    assert Path(line.group(1)) == temporary
    assert "ebbcast_connections 0.0" in d.metrics_text()  # the workers' files merge
    assert len(set(temporary.glob("ebbcast-*")) - before) == 1
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert set(temporary.glob("ebbcast-*")) - before == set()
    assert not missing.exists()
