#!/usr/bin/env bash
# A/B of sealed fetches between two envoys on loopback: for each round, each
# ENVOY build in turn starts a sender (holding a random blob of SIZE_MIB) and
# a receiver with an empty store, and the receiver fetches the blob. Prints
# per run the fetch's wall time, the machine's busy CPU (/proc/stat) and each
# daemon's CPU, then the receiver's "fetched …" log line (hashing, writing,
# readers' wait); at the end, per build, the median and range of the wall
# times and the median machine CPU.
#
# Usage: ab-fetch.sh SIZE_MIB ROUNDS WORKDIR ENVOY [ENVOY...]
# WORKDIR holds the input and the sender's store (kept between runs, made
# with the first ENVOY) and the receiver's state (made afresh each run); it
# must be on a real disk.
# Environment: COLD=1 drops the page cache before each fetch (the sender
# then reads the blob from the disk); OUT=1 fetches with --out; PERF=1
# records the first build's first run with `perf record`, receiver only
# (PERFARGS replaces `-g -p RECEIVER_PID`, e.g. PERFARGS=-a), into
# WORKDIR/perf.data; PERFCMD replaces `record -F 999` (e.g. PERFCMD=stat
# PERFARGS="-a -e syscalls:sys_enter_recvfrom"), perf's own output going to
# WORKDIR/perf.out.
set -euo pipefail
# shellcheck source=envoys.sh
source "$(dirname "$0")/envoys.sh"

if [[ $# -lt 4 ]]; then
    echo "usage: $0 SIZE_MIB ROUNDS WORKDIR ENVOY [ENVOY...]" >&2
    exit 2
fi
size=$1
rounds=$2
mkdir -p "$3"
work=$(cd "$3" && pwd)
shift 3
builds=()
for b in "$@"; do builds+=("$(realpath "$b")"); done
first=${builds[0]}

cd "$work"
mkdir -p snd rcv
: >"$work/walls"
if [[ ! -f input-$size ]]; then
    head -c "${size}M" /dev/urandom >"input-$size.tmp"
    mv "input-$size.tmp" "input-$size"
fi
config() { # NAME ALLOWED_KEY
    printf 'state_dir: "%s/%s"\nlisten: "127.0.0.1:0"\npeers:\n  allow: [%s]\n' \
        "$work" "$1" "$2" >"$1.yaml"
}
config snd ""
config rcv ""
snd_key=$("$first" --config snd.yaml id)
rcv_key=$("$first" --config rcv.yaml id)
config snd "\"$rcv_key\""
config rcv "\"$snd_key\""
id=$(env -u VIGO_CONFIG "$first" --store snd/store --json store add "input-$size" |
    grep -o '"id":"[^"]*"' | cut -d'"' -f4)
# The sender's page cache holds the blob (`store add` wrote it direct).
find snd/store/blobs -type f -exec cat {} + >/dev/null

cpu_s() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
for round in $(seq "$rounds"); do
    for b in "${builds[@]}"; do
        rm -rf rcv/store
        start_envoys "$b"
        sync
        if [[ ${COLD:-0} == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
        sleep 1
        pp=
        if [[ ${PERF:-0} == 1 && $round == 1 && $b == "$first" ]]; then
            # shellcheck disable=SC2086 # PERFCMD and PERFARGS are lists of words
            perf ${PERFCMD:-record -F 999} ${PERFARGS:--g -p $rp} -o "$work/perf.data" 2>"$work/perf.out" &
            pp=$!
        fi
        c0=$(busy_cs)
        t0=$(date +%s.%N)
        out=()
        if [[ ${OUT:-0} == 1 ]]; then rm -f out.bin; out=(--out out.bin); fi
        rc=0
        "$b" --config rcv.yaml fetch "$id" --from "$listen" "${out[@]}" >/dev/null 2>&1 || rc=$?
        t1=$(date +%s.%N)
        c1=$(busy_cs)
        if [[ -n $pp ]]; then kill -INT "$pp"; wait "$pp" || true; fi
        wall=$(echo "$t1 - $t0" | bc)
        echo "round $round $b rc=$rc wall $wall s," \
            "machine $(((c1 - c0)))cs, receiver $(cpu_s $rp) s, sender $(cpu_s $sp) s"
        echo "$b $wall $((c1 - c0))" >>"$work/walls"
        grep -o 'fetched .*' rcv.log | tail -1 || true
        kill "$sp" "$rp"
        wait "$sp" "$rp" || true
    done
done
# Per build: the median and range of the wall times and of the machine's
# CPU (this VM's run-to-run spread is wide: compare medians of alternating
# rounds, not single runs).
for b in "${builds[@]}"; do
    walls=$(awk -v b="$b" '$1 == b { print $2 }' "$work/walls")
    [[ -n $walls ]] || continue
    echo "summary $b: $(wc -l <<<"$walls") runs," \
        "wall median $(median <<<"$walls") s ($(sort -n <<<"$walls" | head -1)-$(sort -n <<<"$walls" | tail -1))," \
        "machine median $(awk -v b="$b" '$1 == b { print $3 }' "$work/walls" | median) cs"
done
