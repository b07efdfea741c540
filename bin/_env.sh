# Shared by bin/test and bin/quickstart: create .venv (once) and install the project into it.
# Usage: source bin/_env.sh   (sets $PY to the venv's python)
# CDC_PYTHON picks the interpreter the virtualenv is made from (default python3, >= 3.10);
# CDC_VENV its folder (default .venv in the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CDC_VENV:-$ROOT/.venv}"
PYTHON="${CDC_PYTHON:-python3}"
# (Re)create when there is no venv, or one without pip: a `python3 -m venv` that failed halfway
# (e.g. Debian/Ubuntu without python3-venv) leaves a python but no pip behind; creating over it
# is safe (it adds what is missing and keeps what is installed).
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found; install Python >= 3.10 or set CDC_PYTHON=/path/to/python3" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "error: cdc needs Python >= 3.10, $PYTHON is $("$PYTHON" -V 2>&1); set CDC_PYTHON=/path/to/python3.10+" >&2
    exit 2
  fi
  echo "==> creating virtualenv $VENV"
  if ! "$PYTHON" -m venv "$VENV" || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "error: could not create a virtualenv with pip in $VENV using $PYTHON (on Debian/Ubuntu: sudo apt install python3-venv), then run this again" >&2
    exit 2
  fi
fi
PY="$VENV/bin/python"
# Reinstall only when the project metadata changed since the last install.
STAMP="$VENV/.cdc-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || ! "$PY" -c "import cdc, torch, typer, webdataset" 2>/dev/null; then
  echo "==> installing cdc and its dependencies (first run: a few minutes)"
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip \
     || ! "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"; then
    echo "error: installing cdc into $VENV failed (pip's message is above); fix that and run this again" >&2
    exit 2
  fi
  touch "$STAMP"
fi
export PY ROOT
