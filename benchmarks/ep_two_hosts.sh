#!/usr/bin/env bash
# EP=2 training across two "hosts": two network namespaces joined by a veth pair, torchrun's c10d
# rendezvous and gloo over that link (needs root / CAP_NET_ADMIN). Compares the loss curve with one
# process. Usage: bash benchmarks/ep_two_hosts.sh [steps]   (run from the repository root)
set -euo pipefail
STEPS=${1:-20}
ROOT=$(pwd)
WORK=${WORK:-/tmp/moekit-ep-2hosts}
H0=moekit-h0; H1=moekit-h1
cleanup() { ip netns del $H0 2>/dev/null || true; ip netns del $H1 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add $H0; ip netns add $H1
ip link add mk-veth0 type veth peer name mk-veth1
ip link set mk-veth0 netns $H0; ip link set mk-veth1 netns $H1
ip netns exec $H0 ip addr add 10.77.0.1/24 dev mk-veth0
ip netns exec $H1 ip addr add 10.77.0.2/24 dev mk-veth1
for h in $H0 $H1; do ip netns exec $h ip link set lo up; done
ip netns exec $H0 ip link set mk-veth0 up; ip netns exec $H1 ip link set mk-veth1 up

mkdir -p "$WORK"
python - "$WORK" <<'PY'
import sys; sys.path[:0] = ["tests", "."]
from pathlib import Path
from train_helpers import tiny_data
print(tiny_data(Path(sys.argv[1])).root, file=open(Path(sys.argv[1]) / "data_root", "w"))
PY
DATA=$(cat $WORK/data_root)
ARGS="train --preset tiny-moe --data-dir $DATA --corpus x --max-steps $STEPS --batch-size 8 --seq-len 32 --threads 1
      --precision fp32 --eval-every 0 --ckpt-every 0 --no-progress --lr 3e-3 --warmup-steps 5 --balance none"
rm -rf $WORK/one $WORK/two
PYTHONPATH=$ROOT python -m moekit $ARGS --out $WORK/one
run() {  # $1 netns, $2 node rank, $3 interface
  ip netns exec $1 env PYTHONPATH=$ROOT OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=$3 \
    python -m torch.distributed.run --nnodes 2 --node-rank $2 --nproc-per-node 1 \
    --master-addr 10.77.0.1 --master-port 29611 -m moekit $ARGS --out $WORK/two --ep 2
}
run $H0 0 mk-veth0 & P0=$!
run $H1 1 mk-veth1 & P1=$!
wait $P0; wait $P1
python - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
one = [json.loads(x)["loss"] for x in open(f"{w}/one/metrics.jsonl")]
two = [json.loads(x)["loss"] for x in open(f"{w}/two/metrics.jsonl")]
d = max(abs(a - b) / abs(b) for a, b in zip(two, one))
print(f"{len(two)} steps across two network namespaces (gloo over veth): max relative loss difference {d:.2e}")
assert len(two) == len(one) and d < 1e-5
PY
