#!/usr/bin/env bash
# Whether direct writes hold up buffered writes to the same file (ext4's inode
# lock, ARCHITECTURE.md "Direct writes through io_uring"): four threads of
# 2 MiB direct random writes (with IOENGINE: psync or io_uring) and one of
# 4 KiB buffered random writes asked for at 2000/s, for 6 s, into a
# preallocated 4 GiB file. Prints each group's bandwidth, IOPS and mean
# completion latency.
#
# Usage: fio-inode-lock.sh IOENGINE [DIR]   (DIR on the disk to test, default /var/tmp)
set -euo pipefail
engine=${1:?usage: $0 psync|io_uring [DIR]}
file=${2:-/var/tmp}/fio-inode-lock.bin
trap 'rm -f "$file"' EXIT
rm -f "$file"
fallocate -l 4G "$file"
sync
fio --output-format=terse --terse-version=3 \
    --name=direct --filename="$file" --size=4G --rw=randwrite --bs=2M --direct=1 \
    --ioengine="$engine" --iodepth=1 --numjobs=4 --runtime=6 --time_based=1 \
    --group_reporting=1 --new_group \
    --name=buffered --filename="$file" --size=4G --rw=randwrite --bs=4k --direct=0 \
    --ioengine=psync --rate_iops=2000 --runtime=6 --time_based=1 --new_group |
    awk -F';' '{print $3, "write_KiB/s", $48, "iops", $49, "clat_mean_us", $57}'
