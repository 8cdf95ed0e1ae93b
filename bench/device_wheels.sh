#!/usr/bin/env bash
# Wheels of what the device machine's image lacks and the `fit` part of bench/run_gpu.sh needs (jsonargparse with its
# signature support, datasets, torchdata and their dependencies the image does not hold), for its Python 3.12 on
# x86-64, at the versions installed here, in .whl/ (ignored by git). Run here, then pass `carry: [".whl"]` to the
# device call: bench/run_gpu.sh installs them first when .whl/ is present.
#
#   bash bench/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
packages=(jsonargparse docstring-parser typeshed-client datasets dill multiprocess torchdata)
pins=()
for package in "${packages[@]}"; do
  version=$(python -m pip show "$package" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "$package is not installed here: run the README's set-up first" >&2; exit 1; }
  pins+=("$package==$version")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
