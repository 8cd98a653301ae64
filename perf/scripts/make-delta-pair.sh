#!/usr/bin/env bash
# Builds a realistic old/new pair for `vigo-perf delta`: the same set of
# Python packages at two adjacent releases (patch or minor bumps), unpacked
# into a site-packages tree and written as two uncompressed, reproducible tar
# files. This resembles "an image and its upgrade": the same layout, most
# files byte-identical or lightly changed, compiled libraries rebuilt.
#
# Only package registries are reachable from these machines, so the trees
# come from PyPI wheels (manylinux x86_64, CPython 3.11), fetched with pip.
#
# Usage: make-delta-pair.sh OUTDIR
# Writes OUTDIR/old.tar and OUTDIR/new.tar (and keeps the wheels in
# OUTDIR/wheels-{old,new} so a rerun does not download again).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)

# name old-version new-version: each new version is the release right after
# the old one (none of them yanked).
packages=(
    "numpy 2.1.2 2.1.3"
    "scipy 1.14.0 1.14.1"
    "pandas 2.2.2 2.2.3"
    "pyarrow 16.0.0 16.1.0"
    "matplotlib 3.9.2 3.9.3"
    "scikit-learn 1.5.1 1.5.2"
    "pillow 10.3.0 10.4.0"
    "grpcio 1.66.1 1.66.2"
    "opencv-python-headless 4.10.0.82 4.10.0.84"
    "onnxruntime 1.19.0 1.19.2"
    "polars 1.8.2 1.9.0"
    "duckdb 1.1.0 1.1.1"
)

for tool in pip unzip tar; do
    command -v "$tool" >/dev/null || { echo "$0: needs $tool on PATH" >&2; exit 1; }
done

# build SIDE (old or new): downloads that side's wheels and tars the unpacked tree.
build() {
    local side=$1
    local wheels="$out/wheels-$side" tree="$out/tree-$side"
    mkdir -p "$wheels"
    local specs=()
    for line in "${packages[@]}"; do
        read -r name old new <<<"$line"
        if [[ $side == old ]]; then specs+=("$name==$old"); else specs+=("$name==$new"); fi
    done
    echo "== $side: ${specs[*]}" >&2
    pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 \
        -d "$wheels" "${specs[@]}"
    rm -rf "$tree"
    mkdir -p "$tree/usr/lib/python3.11/site-packages"
    for spec in "${specs[@]}"; do
        local name=${spec%%==*} version=${spec##*==}
        # Wheel file names normalise '-' to '_' and may change case.
        local pattern
        pattern=$(echo "$name" | tr '-' '_')
        local wheel
        wheel=$(find "$wheels" -maxdepth 1 -iname "${pattern}-${version}-*.whl" | head -n 1)
        [[ -n $wheel ]] || { echo "$0: no wheel for $spec in $wheels" >&2; exit 1; }
        unzip -q -o "$wheel" -d "$tree/usr/lib/python3.11/site-packages"
    done
    # Reproducible: sorted names, fixed times and owners, no pax headers.
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        --format=gnu -C "$tree" -cf "$out/$side.tar" .
    rm -rf "$tree"
    echo "== $side: $(stat -c %s "$out/$side.tar") bytes in $out/$side.tar" >&2
}

build old
build new
