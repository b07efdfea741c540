# Shared by bin/test and bin/quickstart: create .venv (once) and install the project into it.
# Usage: source bin/_env.sh   (sets $PY to the venv's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CDC_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Reinstall only when the project metadata changed since the last install.
STAMP="$VENV/.cdc-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || ! "$PY" -c "import cdc, torch, typer, webdataset" 2>/dev/null; then
  echo "==> installing cdc and its dependencies (first run: a few minutes)"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  touch "$STAMP"
fi
export PY ROOT
