"""``docs/metrics.md``, written from the metrics ebbcast registers.

``make docs`` runs ``python -m ebbcast.metricsdoc > docs/metrics.md``; a test scrapes
a daemon on its own, with workers and with Redis, and fails when it exposes a metric
the reference does not list, or the reference lists one none of them exposes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from ebbcast.core.metrics import Metrics, Readiness, ServingProcesses

_INTRO = """# Metrics reference

<!-- Written by `make docs` from the metrics the daemon registers
     (daemon/ebbcast/core/metrics.py): do not edit. tests/test_metrics_doc.py fails
     when a daemon exposes a metric this file does not list, or the reverse. -->

`GET /metrics` on the admin listener, in the Prometheus text format. Every metric
below is there from the first scrape, each labelled series at 0 before its first
event. The serving processes (one, or `server.workers`) each count their own; the
main process merges them, as the last column says:

- *sum*: counters and the histogram add up over every serving process that ever
  ran, restarted workers and earlier generations included (they never go down);
- *live sum*, *live max*, *live min*: a gauge over the serving processes alive now;
- *main*: the main process's own (`process_*` are its CPU, memory and descriptors;
  the serving processes' are the `ebbcast_worker_*` ones).

What each one tells an operator, and the alerts built on them, are in
[operations.md](operations.md#what-each-metric-tells-an-operator).

| metric | type | labels | with workers | what it is |
|---|---|---|---|---|
"""

_MODES = {"livesum": "live sum", "livemax": "live max", "livemin": "live min",
          "liveall": "each live process", "max": "max", "min": "min", "sum": "sum",
          "all": "each process", "mostrecent": "most recent"}


@dataclass(frozen=True)
class Family:
    """One metric family as a scrape shows it."""

    name: str  # as queried: counters with _total
    kind: str
    labels: tuple[str, ...]
    merged: str
    help: str


def families() -> list[Family]:
    """Every family a daemon exposes: each serving process's (``Metrics``) and what
    the main process adds (readiness, the serving processes' resources)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    registry.register(Readiness(lambda: True))
    registry.register(ServingProcesses(lambda: [(1, "worker-0", os.getpid())]))
    modes = {}
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase):
            mode = getattr(wrapper, "_multiprocess_mode", "")
            for described in wrapper.describe():
                modes[described.name] = _MODES.get(mode, mode) if mode else "sum"
    found = []
    for family in registry.collect():
        labels = sorted({name for sample in family.samples for name in sample.labels
                         if name != "le"})
        name = family.name + ("_total" if family.type == "counter" else "")
        merged = "main" if family.name.startswith("process_") or \
            family.name == "ebbcast_build_info" else modes.get(family.name, "main")
        found.append(Family(name, family.type, tuple(labels), merged,
                            " ".join(family.documentation.split())))
    return sorted(found, key=lambda f: f.name)


def render() -> str:
    rows = []
    for family in families():
        labels = ", ".join(f"`{label}`" for label in family.labels) or "-"
        kind = family.kind + (" (`_bucket`, `_sum`, `_count`)"
                              if family.kind == "histogram" else "")
        rows.append(f"| `{family.name}` | {kind} | {labels} | {family.merged} | "
                    f"{family.help.replace('|', '/')} |")
    return _INTRO + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
