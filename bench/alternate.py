"""Before against after, alternated: one benchmark from an older checkout and from this one.

Usage (from the repository root, after `make test` has built .venv):

    git worktree add /tmp/before <an older commit>
    .venv/bin/python bench/alternate.py --before /tmp/before memory --out bench/results
    .venv/bin/python bench/alternate.py --before /tmp/before run --rounds 3 \\
        --args='--subscribers 1000,10000 --windows 2,16' --out bench/results

A change that should cost nothing must leave the figures within noise. On a shared
VM the noise drifts over minutes, so every "before" run followed by every "after"
run would read drift as a change: here each round runs bench/NAME.py once from the
--before tree, then once from this tree (`PYTHON TREE/bench/NAME.py --out TMP`, in
TREE, with PYTHONPATH=TREE/daemon: that tree's benchmark and daemon code; both
use one load generator, this tree's ($EBBCAST_WSBENCH if set), copied aside so that
the other tree's build cannot replace it with one from its own source), and reads
the JSON it wrote. The headline figures kept:

- run: deliveries per server CPU-second, p50 and p99 ms, per variant x subscribers x
  window (ebbcast and ebbcast-json unless --args names other --variants);
- storm: handshakes per server CPU-second, p50 and p99 ms (the median of the run's
  own rounds; ebbcast only unless --args names other --variants);
- memory: RSS and tracemalloc's bytes per idle connection;
- channels (its fan-out and churn): deliveries and publishes per server CPU-second,
  p50 and p99 ms, for the global broadcast and for channels, per window; subscribe
  and unsubscribe operations per server CPU-second.

Writes NAME-before-after-DATE.md (each round's figures side by side, the median of
each side, after/before, and the spread between one side's rounds) and .json (all
of each run's own JSON) into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import LOADGEN, REPO, build_loadgen, machine_line, save_results
from sequencer import git_head

#: Options passed before --args (a later one of the same name wins).
DEFAULTS = {"run": ["--variants", "ebbcast,ebbcast-json"], "storm": ["--variants", "ebbcast"],
            "memory": [], "channels": ["--skip-memory"]}
LATENCY = (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"))


def figures(name: str, data: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one run's JSON, by label."""
    if name == "memory":
        return {"RSS KB/conn": data["rss_per_conn_bytes"] / 1024,
                "traced KB/conn": data["traced_per_conn_bytes"] / 1024}
    out: dict[str, float] = {}
    if name == "channels":
        for r in data["fanout"]:
            for key, label in (("deliveries_per_cpu_s", "deliveries/CPU-s"),
                               ("publishes_per_cpu_s", "publishes/CPU-s"), *LATENCY):
                out[f"{r['kind']} W={r['window']} {label}"] = r[key]
        out["churn operations/CPU-s"] = data["churn"]["operations_per_cpu_s"]
        return out
    if name == "storm":
        for variant in dict.fromkeys(r["variant"] for r in data["rows"]):
            rows = [r for r in data["rows"] if r["variant"] == variant]
            for key, label in (("handshakes_per_cpu_s", "handshakes/CPU-s"), *LATENCY):
                out[f"{variant} {label}"] = statistics.median(r[key] for r in rows)
        return out
    for r in sorted(data["rows"], key=lambda r: (r["variant"], r["subscribers"], r["window"])):
        cell = f"{r['variant']} N={r['subscribers']:,} W={r['window']}"
        for key, label in (("deliveries_per_cpu_s", "deliveries/CPU-s"), *LATENCY):
            out[f"{cell} {label}"] = r[key]
    return out


def one_generator(folder: Path) -> Path:
    """This tree's load generator, built and copied into ``folder`` with a modification
    time far ahead, so that neither tree's bench rebuilds it from its own (perhaps
    older) source: both sides run this one."""
    built = build_loadgen()
    shared = folder / "wsbench"
    shutil.copy2(built, shared)
    ahead = time.time() + 10 * 365 * 86400
    os.utime(shared, (ahead, ahead))
    return shared


def tree_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree / "daemon"))
    env.setdefault("EBBCAST_WSBENCH", str(LOADGEN))
    return env


def imported_from(python: str, tree: Path) -> str:
    """Where ``import ebbcast`` finds the package with that tree's environment."""
    done = subprocess.run([python, "-c", "import ebbcast; print(ebbcast.__file__)"], cwd=tree,
                          env=tree_env(tree), capture_output=True, text=True, check=True)
    where = done.stdout.strip()
    if not where.startswith(str(tree / "daemon") + os.sep):
        raise SystemExit(f"{tree}: ebbcast is imported from {where}, not from its daemon/")
    return where


def once(python: str, tree: Path, name: str, options: list[str]) -> dict[str, Any]:
    """Run bench/NAME.py from ``tree``; its exit code, seconds and JSON."""
    with tempfile.TemporaryDirectory(prefix="ebbcast-alternate-") as tmp:
        started = time.monotonic()
        done = subprocess.run([python, str(tree / "bench" / f"{name}.py"), "--out", tmp,
                               *options], cwd=tree, env=tree_env(tree),
                              stdout=subprocess.PIPE, text=True)
        saved = sorted(Path(tmp).glob("*.json"))
        if not saved:
            raise SystemExit(f"{tree}: bench/{name}.py exited {done.returncode} with no "
                             f"JSON:\n{done.stdout}")
        return {"returncode": done.returncode, "seconds": time.monotonic() - started,
                "data": json.loads(saved[0].read_text())}


def report(name: str, runs: list[dict[str, Any]], heads: dict[str, str], command: str,
           started: Any) -> str:
    rounds = max(r["round"] for r in runs)
    by = {(r["side"], r["round"]): r["figures"] for r in runs}
    labels = list(dict.fromkeys(k for r in runs for k in r["figures"]))
    head = "".join(f" before {n} | after {n} |" for n in range(1, rounds + 1))
    lines = [f"# {name}.py before and after, alternated, {started:%Y-%m-%d %H:%M} UTC", "",
             f"{machine_line()}.",
             f"Before: {heads['before']}; after: {heads['after']}. Command: `{command}`; "
             f"each round runs before, then after.", "",
             "Spread: (max - min) / median of one side's rounds. `*`: the medians differ "
             "by more than the larger of the two sides' max - min (2 rounds or more).", "",
             f"| figure |{head} median before | median after | after/before "
             "| spread before | spread after |", "|" + "---|" * (2 * rounds + 6)]
    for label in labels:
        sides = {s: [by[s, n][label] for n in range(1, rounds + 1) if label in by.get((s, n), {})]
                 for s in ("before", "after")}
        if not all(sides.values()):
            continue
        mid = {s: statistics.median(v) for s, v in sides.items()}
        spread = {s: max(v) - min(v) for s, v in sides.items()}
        ratio = mid["after"] / mid["before"] if mid["before"] else float("nan")
        beyond = " *" if rounds > 1 and abs(mid["after"] - mid["before"]) > max(
            spread.values()) else ""
        cells = "".join(f" {fmt(by[s, n].get(label))} |" for n in range(1, rounds + 1)
                        for s in ("before", "after"))
        lines.append(f"| {label} |{cells} {fmt(mid['before'])} | {fmt(mid['after'])} "
                     f"| {ratio:.3f}{beyond} "
                     + "".join(f"| {spread[s] / mid[s] if mid[s] else 0:.1%} "
                               for s in ("before", "after")) + "|")
    lines += ["", "Runs: " + "; ".join(
        f"{r['side']} {r['round']} {r['seconds']:.0f} s" + (
            f" (exit {r['returncode']})" if r["returncode"] else "") for r in runs) + "."]
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(DEFAULTS), help="bench/NAME.py")
    parser.add_argument("--before", type=Path, required=True,
                        help="a checkout of the code to compare with (a git worktree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--args", default="", metavar="'OPTIONS'",
                        help="more options for bench/NAME.py, e.g. --args='--connections 5000'")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--quick", action="store_true", help="the benchmark's smoke run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    options = DEFAULTS[args.name] + shlex.split(args.args) + (["--quick"] if args.quick else [])
    trees = {"before": args.before.resolve(), "after": REPO}
    heads = {}
    for side, tree in trees.items():
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "daemon"],
                               capture_output=True, text=True).stdout.strip()
        heads[side] = git_head(tree) + (" (daemon/ modified)" if dirty else "")
        print(f"{side}: {heads[side]}, ebbcast from {imported_from(args.python, tree)}",
              file=sys.stderr)
    command = shlex.join(["bench/alternate.py", *sys.argv[1:]])
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = []
    shared = tempfile.TemporaryDirectory(prefix="ebbcast-alternate-loadgen-")
    os.environ["EBBCAST_WSBENCH"] = str(one_generator(Path(shared.name)))
    for round_ in range(1, args.rounds + 1):
        for side, tree in trees.items():
            print(f"round {round_}, {side}: bench/{args.name}.py {shlex.join(options)}",
                  file=sys.stderr, flush=True)
            run = {"round": round_, "side": side, **once(args.python, tree, args.name, options)}
            run["figures"] = figures(args.name, run["data"])
            runs.append(run)
    text = report(args.name, runs, heads, command, started)
    print(text)
    stem = save_results(args.out, f"{args.name}-before-after", started, text,
                        {"command": command, "options": options, "commits": heads, "runs": runs})
    print(f"written: {stem.with_suffix('.md')}", file=sys.stderr)
    return int(max(r["returncode"] for r in runs))


if __name__ == "__main__":
    sys.exit(main())
