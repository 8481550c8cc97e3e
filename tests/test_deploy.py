"""The shipped deployment files: the Prometheus rules and the Kubernetes manifests.

The rules need Debian's prometheus package for promtool (make test-deps); they fail,
never skip, without it. The manifests are checked offline against the Kubernetes API
schemas (kubernetes-validate).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import REPO, STEP_TIMEOUT, dial, promtool, recv_frame, wait_for

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES, RULE_TESTS = PROMETHEUS / "ebbcast-rules.yml", PROMETHEUS / "ebbcast-rules.test.yml"


@pytest.mark.processes
def test_the_rules_load_and_pass_their_unit_tests():
    checked = promtool("check", "rules", RULES.name, cwd=PROMETHEUS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=PROMETHEUS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test():
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname: (\w+)", RULE_TESTS.read_text(), re.M))
    assert alerts and alerts == tested


def test_the_rules_use_only_metrics_ebbcast_exports(spawn):
    exported = spawn("--port", "0", "--admin-port", "0").metrics_text()
    used = set(re.findall(r"(?<![:\w])(ebbcast_[a-z_]+)\b", RULES.read_text()))  # not records
    missing = {name for name in used
               if not re.search(rf"^{name}(\{{| )", exported, re.M)}
    assert used and not missing, missing


# -- Kubernetes -------------------------------------------------------------------------

KUBERNETES = REPO / "deploy" / "kubernetes" / "ebbcast.yaml"


def kubernetes_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES.read_text()) if doc]


def test_the_kubernetes_manifests_are_valid_for_current_kubernetes_releases():
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for doc in kubernetes_documents():
            kubernetes_validate.validate(doc, version, strict=True)  # raises if not


def test_a_pod_can_drain_before_the_kubelet_kills_it():
    from ebbcast.config import parse_duration

    (deployment,) = [d for d in kubernetes_documents() if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "ebbcast"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = parse_duration(env["EBBCAST_SHUTDOWN_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + pause + 10
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert env["EBBCAST_SERVER_WORKERS"] == "1"
    assert env["EBBCAST_SERVER_HOST"] == env["EBBCAST_ADMIN_HOST"] == "0.0.0.0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["RUNTIME_DIRECTORY"] in mounts  # the only writable place it needs
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_kubernetes_pods_are_joined_probed_with_room_and_scraped_as_the_alerts_expect():
    """More than one replica shares a Redis backplane; no service links; probe
    timeouts well above the loop's worst lateness measured at 100,000 clients (1.9 s);
    the scrape job is the one EbbcastDown watches."""
    documents = kubernetes_documents()
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"
                     and d["metadata"]["name"] == "ebbcast"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["enableServiceLinks"] is False
    assert deployment["spec"]["replicas"] > 1
    redis = env["EBBCAST_BACKPLANE_URL"]
    assert redis.startswith("redis://")
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    assert redis.split("//")[1].split(":")[0] in services  # a Service of this manifest
    assert env["EBBCAST_SERVER_PUBLIC_URL"].startswith("wss://")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 2 * 1.9, probe
    scrape = yaml.safe_load((KUBERNETES.parent / "prometheus-scrape.yml").read_text())
    (job,) = scrape["scrape_configs"]
    watched = re.search(r'up\{job="(\w+)"\} == 0', RULES.read_text())
    assert watched and job["job_name"] == watched.group(1) == "ebbcast"
    kept = {rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"}
    assert kept == {deployment["spec"]["template"]["metadata"]["labels"]
                    ["app.kubernetes.io/name"], "admin"}
    assert "admin" in {port["name"] for port in container["ports"]}


# -- the Grafana dashboard --------------------------------------------------------------

GRAFANA = REPO / "deploy" / "grafana"


def test_the_committed_dashboard_is_what_its_builder_writes():
    """deploy/grafana/ebbcast-dashboard.json is written by `make dashboard`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", GRAFANA / "dashboard.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert (GRAFANA / "ebbcast-dashboard.json").read_text() == builder.render(), \
        "the dashboard JSON is stale: run make dashboard"


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on, from /proc: how a server bound to port 0 is found."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Prometheus:
    """A real Prometheus server, configured by the shipped deploy/prometheus/prometheus.yml
    (with its rules), scraping ``target`` every second, on a port of its own."""

    def __init__(self, target: str, folder: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: install Debian's prometheus package"
        config = folder / "prometheus.yml"
        shipped = (PROMETHEUS / "prometheus.yml").read_text()
        for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"),
                         ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                         ("/etc/prometheus/ebbcast-rules.yml", str(RULES)),
                         ("'127.0.0.1:8001'", f"'{target}'")):
            assert old in shipped, f"deploy/prometheus/prometheus.yml no longer has {old!r}"
            shipped = shipped.replace(old, new)
        config.write_text(shipped)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             "--web.listen-address=127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.url = ""
        wait_for(self._started)

    def _started(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        ports = listening_ports(self.proc.pid)
        if not ports:
            return False
        self.url = f"http://127.0.0.1:{min(ports)}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        return False

    def query(self, expr: str) -> list[Any]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as response:
            body = json.load(response)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def rule_names(self) -> list[str]:
        """The names of every rule Prometheus has loaded."""
        with urllib.request.urlopen(self.url + "/api/v1/rules", timeout=STEP_TIMEOUT) as resp:
            groups = json.load(resp)["data"]["groups"]
        return [rule["name"] for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(STEP_TIMEOUT)


def test_every_dashboard_query_returns_data_from_a_real_prometheus_through_a_drain(spawn,
                                                                               tmp_path):
    d = spawn("--port", "0", "--admin-port", "0", "--drain-timeout", "120s",
              env={"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"})
    a, b = dial(d.ws_url), dial(d.ws_url)
    for ws in (a, b):
        recv_frame(ws, "welcome")
    a.send("before the drain")
    assert recv_frame(b)["text"] == "before the drain"
    prometheus = Prometheus(d.admin_url.split("//")[1], tmp_path)
    try:
        wait_for(lambda: len(prometheus.query("ebbcast_messages_received_total")) == 1)
        d.signal(signal.SIGTERM)  # the drain: the two clients stay for now
        recv_frame(a, "shutdown")
        a.send("during the drain")
        assert recv_frame(b)["text"] == "during the drain"
        wait_for(lambda: [r["value"][1] for r in prometheus.query("ebbcast_draining")] == ["1"])
        wait_for(lambda: float(prometheus.query("ebbcast_messages_received_total")[0]
                               ["value"][1]) == 2)
        dashboard = json.loads((GRAFANA / "ebbcast-dashboard.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        assert len(exprs) >= 15
        for expr in exprs:
            runnable = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            assert prometheus.query(runnable), f"no data for {expr}"
        instances = prometheus.query('count by (instance) (ebbcast_connections)')
        assert [r["metric"]["instance"] for r in instances] == [d.admin_url.split("//")[1]]
        # the shipped rules are loaded and evaluated: a recording rule has the drain
        alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
        assert alerts <= set(prometheus.rule_names())
        wait_for(lambda: prometheus.query("instance:ebbcast_drain_seconds_left") != [])
    finally:
        prometheus.stop()
    a.close()
    b.close()
    assert d.wait_exit() == 0
