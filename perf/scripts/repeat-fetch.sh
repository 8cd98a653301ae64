#!/usr/bin/env bash
# The same two envoys fetch one blob again and again, as in `vigo-perf p2p`
# (whose daemons run for the whole bench): a sender and a receiver start
# once, the receiver fetches the blob ROUNDS times, and the blob is removed
# from the receiver (`store rm`, then `sync`, untimed) after each fetch.
# Prints each fetch's wall time and the machine's busy CPU (/proc/stat),
# then their medians. It shows the run-to-run spread of one build without
# the daemons' start in between (`ab-fetch.sh` starts both afresh for
# every fetch, so its sender maps the blob anew each time).
#
# Usage: repeat-fetch.sh ROUNDS WORKDIR ENVOY
# WORKDIR is one `ab-fetch.sh` prepared (configs and the sender's store);
# the sender's store must hold exactly one blob, the one fetched.
set -euo pipefail
# shellcheck source=envoys.sh
source "$(dirname "$0")/envoys.sh"

if [[ $# -ne 3 ]]; then
    echo "usage: $0 ROUNDS WORKDIR ENVOY" >&2
    exit 2
fi
rounds=$1
work=$(cd "$2" && pwd)
b=$(realpath "$3")
cd "$work"
[[ -f snd.yaml && -f rcv.yaml && -d snd/store ]] || {
    echo "$work was not prepared by ab-fetch.sh" >&2
    exit 1
}
id=$(env -u VIGO_CONFIG "$b" --store snd/store --json store ls |
    grep -o '"id":"[^"]*"' | cut -d'"' -f4)
[[ $(wc -l <<<"$id") == 1 && -n $id ]] || {
    echo "the sender's store must hold exactly one blob: $id" >&2
    exit 1
}
find snd/store/blobs -type f -exec cat {} + >/dev/null
rm -rf rcv/store
sp=
rp=
trap 'kill $sp $rp 2>/dev/null; wait $sp $rp 2>/dev/null || true' EXIT
start_envoys "$b"

walls=()
cpus=()
for round in $(seq "$rounds"); do
    sync
    sleep 1
    c0=$(busy_cs)
    t0=$(date +%s.%N)
    "$b" --config rcv.yaml fetch "$id" --from "$listen" >/dev/null
    t1=$(date +%s.%N)
    c1=$(busy_cs)
    walls+=("$(echo "$t1 - $t0" | bc)")
    cpus+=("$((c1 - c0))")
    echo "round $round wall ${walls[-1]} s, machine ${cpus[-1]}cs"
    grep -o 'fetching .*' rcv.log | tail -1 | grep -o 'sources and manifest.*' || true
    "$b" --config rcv.yaml store rm "$id" >/dev/null 2>&1 ||
        { echo "store rm $id failed: see $work/rcv.log" >&2; exit 1; }
done
echo "summary $b: $rounds runs, wall median $(printf '%s\n' "${walls[@]}" | median) s," \
    "machine median $(printf '%s\n' "${cpus[@]}" | median) cs"
