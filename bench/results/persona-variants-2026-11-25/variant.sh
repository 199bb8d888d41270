#!/bin/bash
# One issue-5 variant as run on 2026-11-25 (from the repo root):
#   bash bench/results/persona-variants-2026-11-25/variant.sh NAME PERSONA_SHARE [wonderland train options...]
# e.g. variant.sh I 1.0 --rank 16 --alpha 32 --iters 40
# Builds the Hatter dataset with that persona share, trains with the quick preset of the commit plus the
# options (the quick preset was r8/alpha 16/60 steps when these ran: options override it), then scores the
# trained arm only (trained_only.py: the same scorer and rule as `wonderland eval`, generation seed 0).
set -e
here=$(dirname "$0"); work=${WORK:-/tmp/p5}; name=$1; share=$2; shift 2
mkdir -p "$work"
.venv/bin/python "$here/dataset.py" "$work/$name-data" "$share"
rm -rf "$work/$name-run"
start=$(date +%s)
.venv/bin/wonderland train --data "$work/$name-data" --out "$work/$name-run" --preset quick "$@" > "$work/$name-train.log" 2>&1
echo "train_s $(( $(date +%s) - start ))"
.venv/bin/python "$here/trained_only.py" "$work/$name-run"
