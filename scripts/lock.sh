#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact versions the README's commands and .ci/run install (as pip
# constraints), resolved with uv (`pip install uv`) from PyPI for CPython 3.11 on x86-64 Linux: attnopt's
# dependencies with its test and hf extras (pyproject.toml), the pins in requirements/lock.in and the
# overrides in requirements/overrides.txt (triton 3.9 for the CPU build of torch 2.13).
# Versions already in the lock are kept where they still fit; pass `--upgrade` to move every package to
# its newest release, or `--upgrade-package NAME` for one. Run the suite (README) before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
"${UV:-uv}" pip compile pyproject.toml requirements/lock.in --extra test --extra hf \
    --override requirements/overrides.txt \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command scripts/lock.sh --output-file requirements/lock.txt "$@"
