#!/usr/bin/env bash
# Profile ebbcast with py-spy while wsbench saturates it: 10,000 subscribers, window 2.
# Usage: bench/profile.sh [OUT.txt]   (needs: .venv/bin/pip install py-spy)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/profile-fanout-10k-w2.txt}
make -s -C bench/loadgen
port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
EBBCAST_BROADCAST_ENVELOPE=raw EBBCAST_BROADCAST_PERIODIC_INTERVAL=0 EBBCAST_LIMITS_MESSAGES_PER_SECOND=0 \
  .venv/bin/ebbcast --port "$port" --admin-port 0 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 1
bench/loadgen/wsbench --port "$port" --subscribers 10000 --window 2 --duration 10 --warmup 1 \
  --poll-us 1000 --quiet --json >/dev/null 2>&1 &
sleep 8   # connected (about 5 s) and under load
raw=$(mktemp)
.venv/bin/py-spy record -p "$server" -d 5 -f raw -o "$raw" >/dev/null 2>&1
wait %2 || true
.venv/bin/python - "$raw" > "$out" <<'PY'
import collections, sys
own, incl, total = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    if not stack:
        continue
    frames, n = stack.split(";"), int(n)
    total += n
    own[frames[-1]] += n
    for frame in set(frames):
        incl[frame] += n
print("py-spy (5 s, 100 samples/s) of ebbcast with 10,000 subscribers, 1 publisher, window 2,")
print("100-byte messages, raw envelope (bench/profile.sh).")
print(f"{total} samples. Own time by line (top 12):")
for frame, n in own.most_common(12):
    print(f"  {100 * n / total:5.1f}%  {frame}")
print("Inclusive time of ebbcast and Tornado frames (top 12):")
mine = [(f, n) for f, n in incl.most_common(60) if "ebbcast" in f or "tornado" in f]
for frame, n in mine[:12]:
    print(f"  {100 * n / total:5.1f}%  {frame}")
PY
rm -f "$raw"
cat "$out"
