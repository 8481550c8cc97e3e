#!/usr/bin/env python3
"""Summarize an Autobahn|Testsuite fuzzingclient report; exit 1 on any failed case.

    python conformance/check.py [REPORT_DIR_OR_INDEX_JSON] [--agent NAME]

The argument is the suite's ``index.json`` or the directory that holds it (the
spec's ``outdir``; default: conformance/reports/full). For each agent (server) in
it, prints one count per behavior (OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED,
FAILED, and any other the suite reports), the cases whose closing behavior is not
OK, and the id of every NON-STRICT and failed case with the suite's reason from
the case's own report file.

A case passes when its behavior is OK, NON-STRICT or INFORMATIONAL and its
closing behavior (behaviorClose) is OK or INFORMATIONAL; anything else fails it,
WRONG CODE and FAILED BY CLIENT included (the suite's page shows those two as
non-strict, but FAILED BY CLIENT is the suite giving up on a server that neither
answered a close nor closed TCP, as case 7.5.1 once did). The one exception is
permessage-deflate, which ebbcast never negotiates: a 12.x or 13.x case may be
UNIMPLEMENTED in behavior (its closing behavior must still be OK or INFORMATIONAL).

Exit status: 0 no failed case; 1 at least one failed case; 2 the report is
missing, unreadable or holds no case.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_REPORT = HERE / "reports" / "full"

PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
PASSING_CLOSE = ("OK", "INFORMATIONAL")
#: Cases of an extension ebbcast does not offer (permessage-deflate): UNIMPLEMENTED.
UNOFFERED_EXTENSION_CASES = ("12.", "13.")
ORDER = PASSING + ("UNIMPLEMENTED", "FAILED")


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key for ids such as "7.9.10" (numeric, so 7.9.10 follows 7.9.9)."""
    return tuple(int(part) if part.isdigit() else 0 for part in case_id.split("."))


def is_failed(case_id: str, result: dict[str, Any]) -> bool:
    behavior, close = result.get("behavior"), result.get("behaviorClose")
    if case_id.startswith(UNOFFERED_EXTENSION_CASES) and behavior == "UNIMPLEMENTED":
        return close not in PASSING_CLOSE
    return behavior not in PASSING or close not in PASSING_CLOSE


def load_index(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    index = path / "index.json" if path.is_dir() else path
    with index.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{index}: not an Autobahn|Testsuite index.json")
    return data


def _events(events: Any) -> str:
    """A short rendering of a case's event list, e.g. ``[message 'Hello, world!']``."""
    if not isinstance(events, list):
        return repr(events)
    shown = []
    for event in events:
        if isinstance(event, list) and event:
            detail = " ".join(repr(e) if isinstance(e, str) else str(e) for e in event[1:2])
            shown.append(f"{event[0]} {detail[:40]}".strip())
        else:
            shown.append(str(event)[:40])
    return "[" + ", ".join(shown) + "]"


def case_reason(report_dir: Path, result: dict[str, Any]) -> str:
    """Why the case ended as it did, from the case's own JSON report, if it is there:
    the case's description, what was received against what a strict (OK) pass
    expects, and the closing behavior."""
    name = result.get("reportfile")
    if not name:
        return ""
    try:
        with (report_dir / name).open(encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return ""
    description = re.sub(r"<[^>]+>", "", str(report.get("description", ""))).split("\n")[0]
    parts = [description.strip()]
    expected = report.get("expected") or {}
    if report.get("behavior") != "OK" and "OK" in expected:
        parts.append(f"received {_events(report.get('received'))}, "
                     f"OK expects {_events(expected['OK'])}")
    elif report.get("behavior") != "OK":
        parts.append(str(report.get("result", "")).strip())
    if report.get("behaviorClose") != "OK":
        parts.append(f"close: {report.get('resultClose', '')}".strip())
    parts.append(f"close code {report.get('remoteCloseCode')} "
                 f"(expected {report.get('expectedClose', {}).get('closeCode')} or none)")
    return "; ".join(p for p in parts if p)


def summarize(agent: str, cases: dict[str, dict[str, Any]], report_dir: Path,
              out: Any = None) -> list[str]:
    """Print the summary for one agent (to ``out``, default sys.stdout as it is at
    the call); return the ids of its failed cases."""
    out = out or sys.stdout
    ids = sorted(cases, key=case_key)
    behaviors = Counter(cases[c].get("behavior") for c in ids)
    closes = Counter(cases[c].get("behaviorClose") for c in ids)
    failed = [c for c in ids if is_failed(c, cases[c])]
    total_ms = sum(int(cases[c].get("duration") or 0) for c in ids)

    print(f"agent {agent}: {len(ids)} cases, {total_ms / 1000:.1f} s of case time", file=out)
    for name in ORDER + tuple(sorted(set(behaviors) - set(ORDER), key=str)):
        print(f"  {name:<14} {behaviors.get(name, 0)}", file=out)
    print(f"  failed (behavior or behaviorClose): {len(failed)}", file=out)
    odd_closes = {k: v for k, v in closes.items() if k not in ("OK", "INFORMATIONAL",
                                                                "UNIMPLEMENTED")}
    if odd_closes:
        print("  closing behavior not OK: "
              + ", ".join(f"{k} {v}" for k, v in sorted(odd_closes.items(), key=str)), file=out)
        for c in ids:
            close = cases[c].get("behaviorClose")
            if close in odd_closes:
                print(f"    {c}: behaviorClose {close}", file=out)
    for label, selected in (("NON-STRICT", [c for c in ids
                                             if cases[c].get("behavior") == "NON-STRICT"]),
                            ("FAILED", failed)):
        if selected:
            print(f"  {label} cases: {' '.join(selected)}", file=out)
            for c in selected:
                r = cases[c]
                why = case_reason(report_dir, r)
                print(f"    {c}: behavior {r.get('behavior')}, behaviorClose "
                      f"{r.get('behaviorClose')}" + (f" - {why}" if why else ""), file=out)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", nargs="?", type=Path, default=DEFAULT_REPORT,
                        help="index.json or the directory holding it "
                             f"(default: {DEFAULT_REPORT})")
    parser.add_argument("--agent", help="check only this agent (default: every agent)")
    args = parser.parse_args(argv)

    try:
        index = load_index(args.report)
    except (OSError, ValueError) as exc:
        print(f"check.py: cannot read the report: {exc}", file=sys.stderr)
        return 2
    report_dir = args.report if args.report.is_dir() else args.report.parent
    agents = [args.agent] if args.agent else sorted(index)
    failed_total = 0
    checked = 0
    for agent in agents:
        cases = index.get(agent)
        if not cases:
            print(f"check.py: no cases for agent {agent!r} in the report", file=sys.stderr)
            return 2
        checked += len(cases)
        failed_total += len(summarize(agent, cases, report_dir))
    if not checked:
        print("check.py: the report holds no case", file=sys.stderr)
        return 2
    if failed_total:
        print(f"check.py: {failed_total} case(s) FAILED", file=sys.stderr)
        return 1
    print(f"check.py: no failed case ({checked} checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
