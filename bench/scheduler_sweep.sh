#!/bin/sh
# The scheduler tables of docs/bench/scheduler.md: every openb trace and the generated families
# (gpuvisor sim generate), under the published protocol, policies side by side: one JSON file per
# trace in OUTDIR/json (`gpuvisor -o json sim ...`), summarised by bench/scheduler_sweep.py.
# Usage: bench/scheduler_sweep.sh OUTDIR [SEEDS] [GENSEED] [POLICIES]
#   defaults: seeds 42..51, generator seed 2 (the confirmation families), bestfit,fgd,gvfrag.
set -eu
OUT=${1:?usage: $0 OUTDIR [SEEDS] [GENSEED] [POLICIES]}
SEEDS=${2:-42..51}
GENSEED=${3:-2}
POLICIES=${4:-bestfit,fgd,gvfrag}
B=${GPUVISOR:-./target/release/gpuvisor}
D=${OPENB:-/work/shared/data/openb}
NODES=$D/openb_node_list_gpu_node.csv
mkdir -p "$OUT/families"
mkdir -p "$OUT/json"
run() { # name podfile
  "$B" -o json sim --nodes "$NODES" --pods "$2" --policy "$POLICIES" --seeds "$SEEDS" \
    > "$OUT/json/$1.json"
}
for t in default cpu0 cpu037 cpu050 cpu072 cpu100 cpu200 cpu235 cpu250 cpu300; do
  run "$t" "$D/openb_pod_list_$t.csv"
done
for f in gpu-spec:0.10 gpu-spec:0.20 gpu-spec:0.25 gpu-spec:0.33 \
         share:0.2 share:0.4 share:0.6 share:0.8 share:1.0 \
         multi:0.2 multi:0.3 multi:0.4 multi:0.5; do
  file="$OUT/families/$(echo "$f" | tr ':' '_')-seed$GENSEED.csv"
  "$B" sim generate --from "$D/openb_pod_list_default.csv" --nodes "$NODES" \
    --family "$f" --seed "$GENSEED" --out "$file"
  run "$f" "$file"
done
