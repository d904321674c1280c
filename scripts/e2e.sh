#!/usr/bin/env bash
# End-to-end tests: the real `openai` and `anthropic` Python SDKs against
# `tollgate run` in front of `tollgate mock`, all on 127.0.0.1.
#
# Usage: scripts/e2e.sh [pytest args...]
#   TOLLGATE_BIN  the binary to test (default: target/debug/tollgate).
#                 This script does NOT build it; run `cargo build` first.
#   E2E_PYTHON    the interpreter for the venv (default: python3, needs 3.11+).
#
# The venv lives in the user's cache, one per requirements file and Python
# version ($XDG_CACHE_HOME/tollgate/e2e-venv-py<X.Y>-<sha256 prefix>, or
# $TOLLGATE_VENV), so a fresh clone reuses it; $REPO/.venv links to it. It
# is reused when its stamp (the sha256 of tests/e2e/requirements.txt)
# matches and pip reports the pinned versions. Runs at once take turns on a
# lock while installing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

REQS="$REPO/tests/e2e/requirements.txt"
PYTHON="${E2E_PYTHON:-python3}"

die() { echo "e2e.sh: error: $*" >&2; exit 1; }

BIN="${TOLLGATE_BIN:-target/debug/tollgate}"
case "$BIN" in /*) ;; *) BIN="$REPO/$BIN" ;; esac
[ -f "$BIN" ] || die "no binary at $BIN (build it first: cargo build)"
[ -x "$BIN" ] || die "$BIN is not executable"
export TOLLGATE_BIN="$BIN"

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
"$PYTHON" - <<'EOF' || die "Python 3.11 or newer is required"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

sha256_of() {
    "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

want="$(sha256_of "$REQS")"

# One venv per requirements file and interpreter version, in the user's
# cache when there is a usable one (an absolute $XDG_CACHE_HOME or $HOME).
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "${XDG_CACHE_HOME:-}" in
    /*) CACHE="$XDG_CACHE_HOME/tollgate" ;;
    *) case "${HOME:-}" in /?*) CACHE="$HOME/.cache/tollgate" ;; *) CACHE="" ;; esac ;;
esac
if [ -n "${TOLLGATE_VENV:-}" ]; then
    case "$TOLLGATE_VENV" in /*) VENV="$TOLLGATE_VENV" ;; *) VENV="$REPO/$TOLLGATE_VENV" ;; esac
elif [ -n "$CACHE" ] && mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; then
    VENV="$CACHE/e2e-venv-py$pyver-${want:0:16}"
else
    VENV="$REPO/.venv"   # no usable cache: keep it in the clone
fi
VENV="${VENV%/}"
STAMP="$VENV/.tollgate-e2e-requirements.sha256"
mkdir -p "$(dirname "$VENV")"
# Runs at once take turns while one installs (flock is util-linux; without
# it, no lock).
LOCKED=""
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock -w 900 9 || die "waited 15 minutes for $VENV.lock"
    LOCKED=1
fi

# Does the venv hold exactly the pinned versions? (pins are `name==version`)
venv_matches() {
    [ -x "$VENV/bin/python" ] || return 1
    [ -f "$STAMP" ] || return 1
    [ "$(cat "$STAMP")" = "$want" ] || return 1
    "$VENV/bin/python" - "$REQS" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, pinned = line.partition("==")
    try:
        if version(name.strip()) != pinned.strip():
            bad.append(name)
    except PackageNotFoundError:
        bad.append(name)
sys.exit(1 if bad else 0)
EOF
}

if venv_matches; then
    echo "e2e.sh: reusing $VENV"
else
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "e2e.sh: updating $VENV"
    else
        echo "e2e.sh: creating $VENV"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" || die "could not create the venv (is python3-venv installed?)"
    fi
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS" \
        || die "pip install -r $REQS failed"
    echo "$want" >"$STAMP"
    venv_matches || { rm -f "$STAMP"; die "installed versions do not match $REQS"; }
fi

# scripts/deploy-check.sh and the README use ./.venv: link it to the venv
# (replacing, atomically, a link or a venv an older version left there).
if ! [ "$VENV" -ef "$REPO/.venv" ]; then
    if [ -e "$REPO/.venv" ] && ! [ -L "$REPO/.venv" ]; then
        rm -rf "$REPO/.venv"
    fi
    ln -sfn "$VENV" "$REPO/.venv.tmp.$$"
    mv -Tf "$REPO/.venv.tmp.$$" "$REPO/.venv"
fi
if [ -n "$LOCKED" ]; then
    flock -u 9
    exec 9>&-
fi

echo "e2e.sh: TOLLGATE_BIN=$TOLLGATE_BIN"
# Keep pytest's cache (for --lf) and bytecode out of the source tree.
export PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" -m pytest -q -o cache_dir="$VENV/.pytest_cache" tests/e2e "$@"
