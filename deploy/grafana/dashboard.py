"""Builds ebbcast-dashboard.json (Grafana) with grafanalib: ``make dashboard``.

Every panel's query is a plain PromQL expression over ebbcast's own metrics;
``tests/test_deploy.py`` runs each against a real Prometheus scraping a real
daemon through a drain, and checks that the committed JSON is what this writes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from grafanalib.core import (Dashboard, DataSourceInput, GridPos, RowPanel, Stat, Target,
                             Template, Templating, TimeSeries)
from grafanalib._gen import DashboardEncoder

DATASOURCE = "${DS_PROMETHEUS}"
#: Every query selects the instances chosen in the dashboard's variable.
SEL = 'instance=~"$instance"'

#: (title, unit, [(expr, legend)], width): one time series panel each.
SERIES: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Connections", "short",
     [(f"sum by (instance) (ebbcast_connections{{{SEL}}})", "{{instance}}")], 12),
    ("Handshakes accepted and refused per second", "reqps",
     [(f"sum by (instance) (rate(ebbcast_connections_accepted_total{{{SEL}}}"
       "[$__rate_interval]))", "accepted {{instance}}"),
      (f"sum by (reason) (rate(ebbcast_connections_rejected_total{{{SEL}}}"
       "[$__rate_interval]))", "refused: {{reason}}")], 12),
    ("Disconnections per second, by reason", "reqps",
     [(f"sum by (reason) (rate(ebbcast_disconnections_total{{{SEL}}}[$__rate_interval]))",
       "{{reason}}")], 12),
    ("Messages per second", "reqps",
     [(f"sum (rate(ebbcast_messages_received_total{{{SEL}}}[$__rate_interval]))",
       "received"),
      (f"sum (rate(ebbcast_messages_sent_total{{{SEL}}}[$__rate_interval]))", "sent"),
      (f"sum by (source) (rate(ebbcast_broadcasts_total{{{SEL}}}[$__rate_interval]))",
       "broadcasts: {{source}}")], 12),
    ("Fan-out time of one broadcast", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate("
       f"ebbcast_broadcast_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))", f"p{p}")
      for q, p in (("0.5", "50"), ("0.99", "99"))], 12),
    ("Drain: clients left and seconds to the deadline", "short",
     [(f"sum by (instance) (ebbcast_connections{{{SEL}}}) "
       f"and on (instance) ebbcast_draining{{{SEL}}} == 1", "clients left {{instance}}"),
      (f"(ebbcast_drain_deadline_timestamp_seconds{{{SEL}}} - time()) "
       f"and ebbcast_draining{{{SEL}}} == 1", "seconds left {{instance}}")], 12),
    ("Resumes per second", "reqps",
     [(f"sum by (result) (rate(ebbcast_resumes_total{{{SEL}}}[$__rate_interval]))",
       "{{result}}")], 12),
    ("Backplane: frames dropped and missed per second", "reqps",
     [(f"sum (rate(ebbcast_backplane_dropped_total{{{SEL}}}[$__rate_interval]))", "dropped"),
      (f"sum (rate(ebbcast_backplane_missed_total{{{SEL}}}[$__rate_interval]))", "missed")],
     12),
]

#: (title, expr): one stat panel each, on the top row.
STATS: list[tuple[str, str]] = [
    ("Connections", f"sum (ebbcast_connections{{{SEL}}})"),
    ("Ready instances", f"sum (ebbcast_ready{{{SEL}}})"),
    ("Draining", f"max (ebbcast_draining{{{SEL}}})"),
    ("Generation", f"max (ebbcast_generation{{{SEL}}})"),
    ("Upgrades failed (24 h)",
     f'sum (increase(ebbcast_upgrades_total{{{SEL}, result="failed"}}[24h]))'),
    ("Backplane up", f"min (ebbcast_backplane_up{{{SEL}}})"),
    ("Backplane failovers (24 h)",
     f"sum (increase(ebbcast_backplane_failovers_total{{{SEL}}}[24h]))"),
]


STAT_WIDTH = 24 // len(STATS)


def queries() -> list[str]:
    """Every PromQL expression of the dashboard, in panel order."""
    return [expr for _, expr in STATS] + \
        [expr for _, _, targets, _ in SERIES for expr, _ in targets]


def build() -> Dashboard:
    panels: list[Any] = [RowPanel(title="Now", gridPos=GridPos(h=1, w=24, x=0, y=0))]
    for i, (title, expr) in enumerate(STATS):
        panels.append(Stat(title=title, dataSource=DATASOURCE,
                           targets=[Target(expr=expr, refId="A")],
                           gridPos=GridPos(h=4, w=STAT_WIDTH, x=STAT_WIDTH * i, y=1)))
    y = 5
    for i, (title, unit, targets, width) in enumerate(SERIES):
        x = 0 if i % 2 == 0 else 12
        panels.append(TimeSeries(
            title=title, dataSource=DATASOURCE, unit=unit,
            targets=[Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + k))
                     for k, (expr, legend) in enumerate(targets)],
            gridPos=GridPos(h=8, w=width, x=x, y=y)))
        if x == 12:
            y += 8
    return Dashboard(
        title="ebbcast", uid="ebbcast", timezone="browser", refresh="10s",
        description="Connections, handshakes, disconnections by reason, fan-out time, "
                    "drain progress, generations and upgrades, resumes, the backplane.",
        inputs=[DataSourceInput(name="DS_PROMETHEUS", label="Prometheus",
                                pluginId="prometheus", pluginName="Prometheus")],
        templating=Templating(list=[Template(
            name="instance", label="instance", dataSource=DATASOURCE, includeAll=True,
            multi=True, default="$__all", query="label_values(ebbcast_connections, instance)",
            type="query")]),
        panels=panels).auto_panel_ids()


def render() -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2,
                      sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
