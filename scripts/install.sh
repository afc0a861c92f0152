#!/usr/bin/env bash
# Install polyinr with its locked dependencies: the system libraries FFCV compiles against,
# a venv at ${VENV:-.venv} (none with POLYINR_NO_VENV=1), torch first, then the lock.
# Used by `make setup`, .ci/run and the Dockerfile. Rerunning is a no-op unless
# requirements.lock or pyproject.toml changed (a sha256 stamp inside the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
say() { echo "install.sh: $*"; }

# System packages (Debian/Ubuntu): a C++ compiler, pkg-config, libjpeg-turbo and OpenCV for
# FFCV's extension; chromium for the UI checks (scripts/ui_check.py); Python headers and venv
# support only where this Python lacks them.
if [[ ${POLYINR_SKIP_APT:-0} != 1 ]]; then
    want=(g++ pkg-config libturbojpeg0-dev libopencv-dev chromium)
    "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(
        os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || want+=(python3-dev)
    [[ ${POLYINR_NO_VENV:-0} == 1 ]] || "$PYTHON" -c 'import ensurepip' 2>/dev/null ||
        want+=(python3-venv)
    missing=()
    for pkg in "${want[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || { say "run as root to apt-get install ${missing[*]}" \
            "(or install them yourself and set POLYINR_SKIP_APT=1)"; exit 1; }
        say "apt-get install ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
        say "system packages present: ${want[*]}"
    fi
fi

if [[ ${POLYINR_NO_VENV:-0} == 1 ]]; then
    py=$PYTHON
else
    [[ -x $VENV/bin/python ]] || { say "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
    py=$VENV/bin/python
fi

stamp="$("$py" -c 'import sys; print(sys.prefix)')/.polyinr-install.sha256"
digest=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(<"$stamp") == "$digest" ]]; then
    say "up to date ($stamp matches requirements.lock + pyproject.toml)"
    exit 0
fi

pip=("$py" -m pip install --progress-bar off)
say "upgrading pip"
"${pip[@]}" --upgrade pip
# torch first, at the lock's pins: resolving it together with the rest makes pip backtrack.
say "installing torch and torchvision (pinned by requirements.lock)"
"${pip[@]}" -c requirements.lock torch torchvision
say "installing polyinr[dev] with requirements.lock as constraints"
"${pip[@]}" -c requirements.lock -e '.[dev]'
echo "$digest" >"$stamp"
say "done; stamp $stamp"
