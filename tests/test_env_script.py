"""bin/_env.sh (the set-up step of bin/quickstart and bin/test) on machines it cannot use: one line
saying what to fix, exit 2, and nothing that blocks the next attempt."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source(tmp_path: Path, python: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CDC_PYTHON=python, CDC_VENV=str(tmp_path / "venv"))
    return subprocess.run(["bash", "-c", f"source {ROOT / 'bin' / '_env.sh'}"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def _stub(tmp_path: Path, body: str) -> str:
    p = tmp_path / "python-stub"
    p.write_text(f"#!/usr/bin/env bash\n{body}\n")
    p.chmod(0o755)
    return str(p)


def test_missing_interpreter(tmp_path):
    r = _source(tmp_path, str(tmp_path / "no-such-python"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no-such-python'} not found; install Python >= 3.10 or set CDC_PYTHON=/path/to/python3"
    ]


def test_too_old_interpreter(tmp_path):
    # answers the version check like Python 3.9 would, and says it is 3.9
    stub = _stub(tmp_path, 'case "$1" in -c) exit 1;; -V) echo "Python 3.9.18";; esac')
    r = _source(tmp_path, stub)
    assert r.returncode == 2 and "needs Python >= 3.10" in r.stderr and "Python 3.9.18" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_venv_without_pip_is_a_one_line_hint_and_retried_next_time(tmp_path):
    # `-m venv` fails halfway (Debian/Ubuntu without python3-venv): a python but no pip is left
    real = sys.executable
    stub = _stub(
        tmp_path,
        f'if [ "$1" = -m ] && [ "$2" = venv ]; then "{real}" -m venv --without-pip "$3"; '
        f'echo "ensurepip is not available" >&2; exit 1; fi\nexec "{real}" "$@"',
    )
    r = _source(tmp_path, stub)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "python3-venv" in last and "run this again" in last
    assert (tmp_path / "venv" / "bin" / "python").exists()  # the half-made venv is left ...
    r = _source(tmp_path, stub)  # ... and the next run tries to make it again instead of skipping it
    assert r.returncode == 2 and "creating virtualenv" in r.stdout
