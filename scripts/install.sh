#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs relu-sparsity into it, pinned to the versions of the
# GPU image (constraints.txt). `install.sh test` adds the test tools. Python 3.12 is looked for on
# PATH, then under pyenv; a pyenv shim that cannot run (no version selected) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "test" ] && extras="[test]"

works() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; }

python=""
for candidate in "${PYTHON:-}" python3.12 python3; do
  [ -n "$candidate" ] || continue
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if works "$path"; then python=$path; break; fi
done
if [ -z "$python" ] && command -v pyenv >/dev/null 2>&1; then
  for path in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
    if [ -x "$path" ] && works "$path"; then python=$path; fi  # the newest 3.12 wins
  done
fi
if [ -z "$python" ]; then
  echo "install.sh: no Python 3.12 found (tried \$PYTHON, python3.12 and python3 on PATH, then" \
       "pyenv's versions). Install Python 3.12 or set PYTHON=/path/to/python3.12." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ] || ! works .venv/bin/python; then
  rm -rf .venv
  "$python" -m venv .venv
fi
echo "install.sh: $(.venv/bin/python --version) in .venv (from $python)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
