#!/usr/bin/env bash
# Times a delta fetch between two envoys on loopback: the receiver holds a
# random blob of SIZE_MIB, the sender a copy whose first 8 bytes differ, so
# the receiver copies all but one chunk from its local blob and fetches the
# rest. Prints the fetch's wall time and the receiver's log lines for the
# local copies and the fetch ("… bytes held locally … in S s: reading …").
#
# Usage: delta-fetch.sh ENVOY SIZE_MIB WORKDIR
# ENVOY is an envoy binary (e.g. target/release/envoy); WORKDIR holds the
# inputs (kept between runs) and both envoys' state (made afresh each run).
# A/B two builds by running the script alternately with each.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: $0 ENVOY SIZE_MIB WORKDIR" >&2
    exit 2
fi
envoy=$(realpath "$1")
size=$2
work=$3
mkdir -p "$work"
work=$(cd "$work" && pwd)

old=$work/old-$size
new=$work/new-$size
if [[ ! -f $old ]]; then
    head -c "${size}M" /dev/urandom >"$old.tmp"
    mv "$old.tmp" "$old"
fi
if [[ ! -f $new ]]; then
    cp "$old" "$new.tmp"
    printf 'changed!' | dd of="$new.tmp" conv=notrunc status=none
    mv "$new.tmp" "$new"
fi

w=$work/envoys
rm -rf "$w"
mkdir -p "$w/s" "$w/r"
config() { # NAME ALLOWED_KEY
    printf 'state_dir: "%s"\nlisten: "127.0.0.1:0"\npeers:\n  allow: [%s]\n' \
        "$w/$1" "${2:+\"$2\"}" >"$w/$1/envoy.yaml"
}
config s ""
config r ""
sender_key=$("$envoy" --config "$w/s/envoy.yaml" id | head -1)
receiver_key=$("$envoy" --config "$w/r/envoy.yaml" id | head -1)
config s "$receiver_key"
config r "$sender_key"

json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
id=$("$envoy" --store "$w/s/store" --json store add "$new" | json_field '["id"]')
"$envoy" --store "$w/r/store" --json store add "$old" >/dev/null

VIGO_LOG=info "$envoy" --config "$w/s/envoy.yaml" run >/dev/null 2>"$w/s.log" &
sender=$!
VIGO_LOG=info "$envoy" --config "$w/r/envoy.yaml" run >/dev/null 2>"$w/r.log" &
receiver=$!
trap 'kill $sender $receiver 2>/dev/null; wait' EXIT
listen=
for _ in $(seq 50); do
    listen=$("$envoy" --config "$w/s/envoy.yaml" --json status 2>/dev/null | tail -1 |
        json_field '["daemon"]["listen"]' 2>/dev/null) && [[ -n $listen ]] && break
    sleep 0.1
done

sync
start=$(date +%s.%N)
"$envoy" --config "$w/r/envoy.yaml" --json fetch "$id" --from "$listen" >"$w/fetch.json"
end=$(date +%s.%N)
echo "delta fetch of ${size} MiB: wall $(python3 -c "print(round($end - $start, 2))") s," \
    "$(json_field '["bytes_local"]' <"$w/fetch.json") bytes local," \
    "$(json_field '["bytes_fetched"]' <"$w/fetch.json") fetched"
grep -o "[0-9]* bytes held locally.*\|received in.*" "$w/r.log" || true
