#!/usr/bin/env bash
# The suite against the newest releases of attnopt's dependencies, without the lock: a fresh .venv-latest
# with $TORCH installed first (default: the torch pin of requirements/lock.in; e.g. TORCH=torch==2.14.1 to
# try another; never a bare range, which pip would resolve to the newest CUDA build), then the test extra
# resolved unpinned. Arguments go to pytest (default: the whole suite on 2 workers).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pin=$(grep -o '^torch==[^ ]*' requirements/lock.in)
rm -rf .venv-latest
python3 -m venv .venv-latest
.venv-latest/bin/pip install "${TORCH:-$torch_pin}"
.venv-latest/bin/pip install -e ".[test]"
.venv-latest/bin/pip freeze --exclude-editable
[ $# -gt 0 ] || set -- -n 2
.venv-latest/bin/python -m pytest "$@"
