#!/usr/bin/env bash
# Issue #2 figures: the shipped int8_cpu_openvino recipe on the real ResNet-50 (CIFAR-10),
# full 10,000-image test split, calibration from the training split, 2 threads for every runtime,
# in one run of one command. Writes benchmarks/results/resnet50_int8_openvino/report.{json,md};
# the engines go to benchmarks/work/ (not committed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
shared="${SHARED:-$repo/../shared}"
compress="${COMPRESS:-$repo/.venv/bin/compress}"
work="$here/work/resnet50_int8_openvino"
dest="$here/results/resnet50_int8_openvino"

"$compress" "$shared/models/resnet50_cifar10.pt" --recipe int8_cpu_openvino --trust-model \
    --data "$shared/datasets/cifar10" --threads 2 --no-cache --out "$work" --overwrite "$@" || status=$?
mkdir -p "$dest"
cp "$work/report.json" "$work/report.md" "$dest/"
"${PYTHON:-$repo/.venv/bin/python}" "$here/scrub_paths.py" "$dest" >/dev/null  # no absolute paths in the report
echo "report: $dest/report.md"
exit "${status:-0}"
