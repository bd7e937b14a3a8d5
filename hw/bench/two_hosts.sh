#!/usr/bin/env bash
# Prefill and decode on two "hosts": network namespaces joined by a veth pair, the prefill
# host's egress shaped with tc tbf, then `disagg-hw bench` drives the cluster from the prefill
# host. Needs root. Usage:
#
#   [STREAM=false] hw/bench/two_hosts.sh [RATE (tc syntax, default 400mbit)] [SCENARIO] [OUT_DIR]
#
# STREAM=false makes the prefill worker send the KV whole once the prefill is done, instead of
# layer by layer while it computes.
#
# The frontend and the prefill worker share host a (10.213.1.1); the decode worker is host b
# (10.213.1.2). Every KV transfer crosses the shaped link.
set -euo pipefail
cd "$(dirname "$0")/../.."
RATE=${1:-400mbit}
SCENARIO=${2:-configs/scenarios/smollm2-cpu.toml}
OUT=${3:-out/two-hosts-$RATE}
STREAM=${STREAM:-true}
BIN=target/release/disagg-hw
A=dg-bench-a B=dg-bench-b
CONFIG=$(mktemp --suffix=.toml)
cat >"$CONFIG" <<TOML
[model]
id = "smollm2-135m"

[frontend]
addr = "10.213.1.1:8000"
registry_addr = "10.213.1.1:8100"

[[worker]]
name = "prefill-0"
role = "prefill"
addr = "10.213.1.1:8201"
stream_kv_layers = $STREAM

[[worker]]
name = "decode-0"
role = "decode"
addr = "10.213.1.2:8202"
kv_addr = "10.213.1.2:8302"
TOML

cleanup() {
    for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -f "$CONFIG"
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip link add dgbench-a type veth peer name dgbench-b
ip link set dgbench-a netns "$A"
ip link set dgbench-b netns "$B"
ip -n "$A" addr add 10.213.1.1/24 dev dgbench-a
ip -n "$B" addr add 10.213.1.2/24 dev dgbench-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set dgbench-a up
ip -n "$B" link set dgbench-b up
ip netns exec "$A" tc qdisc add dev dgbench-a root tbf rate "$RATE" burst 64kb latency 100ms

ip netns exec "$A" "$BIN" frontend --config "$CONFIG" &
ip netns exec "$A" "$BIN" prefill --config "$CONFIG" --name prefill-0 &
ip netns exec "$B" "$BIN" decode --config "$CONFIG" --name decode-0 &
# Ready when a completion gets through (the frontend answers 503 until both workers joined).
for _ in $(seq 1 600); do
    if ip netns exec "$A" python3 -c "
import json, sys, urllib.request
body = json.dumps({'model': 'smollm2-135m', 'prompt': 'Hi', 'max_tokens': 1}).encode()
req = urllib.request.Request('http://10.213.1.1:8000/v1/completions', body, {'content-type': 'application/json'})
sys.exit(0 if urllib.request.urlopen(req, timeout=5).status == 200 else 1)
" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
ip netns exec "$A" "$BIN" bench --scenario "$SCENARIO" --target http://10.213.1.1:8000 --out "$OUT"
