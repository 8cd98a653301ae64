# Shared by ab-fetch.sh and repeat-fetch.sh (sourced, run in WORKDIR with
# snd.yaml and rcv.yaml).

# start_envoys ENVOY: starts the sender and the receiver (logs in snd.log and
# rcv.log), sets `sp` and `rp` to their PIDs and `listen` to the sender's
# address once both answer on their control sockets.
start_envoys() {
    VIGO_LOG=info "$1" --config snd.yaml run 2>snd.log &
    sp=$!
    VIGO_LOG=info "$1" --config rcv.yaml run 2>rcv.log &
    rp=$!
    listen=
    for _ in $(seq 100); do
        listen=$("$1" --config snd.yaml --json status 2>/dev/null |
            grep -o '"listen":"[^"]*"' | head -1 | cut -d'"' -f4) || true
        if [[ -n $listen ]] && "$1" --config rcv.yaml status >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "the envoys did not start: see $PWD/snd.log and $PWD/rcv.log" >&2
    return 1
}

# The machine's busy CPU so far, in 1/100 s (steal excluded).
busy_cs() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }

# The median of the numbers on stdin, one per line.
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
