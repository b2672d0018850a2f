# shellcheck shell=bash
# Shared virtualenv bootstrap for bin/ith-proxy and bin/test. Source it (it
# does not change the caller's shell options or working directory), then:
#
#   ith_bootstrap requirements.txt        # or requirements-dev.txt
#
# which sets REPO (the repository root) and VENV, and makes sure $VENV holds
# the pinned requirements:
#
#   * VENV is $ITH_PROXY_VENV, default $REPO/.venv;
#   * it is created with $ITH_PROXY_PYTHON, else python3.11, else python3
#     (>= 3.11 required);
#   * requirements are (re)installed when the venv is new or when the sha256
#     of the requirements file (plus the files it includes with -r) differs
#     from the stamp $VENV/.ith-stamp-<file>; otherwise nothing runs, so a
#     re-run costs a few milliseconds;
#   * installs are serialised with flock on $REPO/.venv.lock, so two first
#     runs at once do not race;
#   * pip/venv output goes to $VENV.bootstrap.log; a failure prints one line
#     pointing at it and exits 1.

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)"
VENV="${ITH_PROXY_VENV:-$REPO/.venv}"

_ith_die() {
    echo "ith-proxy: $*" >&2
    exit 1
}

# sha256 of a requirements file and of the files it includes with -r/--requirement.
_ith_req_hash() {
    local file="$1" dir inc
    dir="$(dirname "$file")"
    {
        cat "$file"
        sed -n -E 's/^[[:space:]]*(-r|--requirement)[[:space:]=]*([^[:space:]#]+).*/\2/p' "$file" |
            while read -r inc; do
                case "$inc" in /*) cat "$inc" ;; *) cat "$dir/$inc" ;; esac
            done
    } | sha256sum | cut -d' ' -f1
}

_ith_included() {
    sed -n -E 's/^[[:space:]]*(-r|--requirement)[[:space:]=]*([^[:space:]#]+).*/\2/p' "$1"
}

_ith_pick_python() {
    local py
    if [ -n "${ITH_PROXY_PYTHON:-}" ]; then
        py="$ITH_PROXY_PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        py=python3.11
    elif command -v python3 >/dev/null 2>&1; then
        py=python3
    else
        _ith_die "no python3 found; Python >= 3.11 is required"
    fi
    if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
        _ith_die "Python >= 3.11 is required, but $py is $("$py" -V 2>&1 || echo unusable)"
    fi
    echo "$py"
}

# Is $VENV a usable venv with Python >= 3.11?
_ith_venv_ok() {
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

ith_bootstrap() {
    local req="$REPO/$1"
    local stamp want log lock lockfd="" py inc
    [ -f "$req" ] || _ith_die "missing $req"
    want="$(_ith_req_hash "$req")"
    stamp="$VENV/.ith-stamp-$(basename "$req")"

    # Fast path: no lock, no writes (works on a read-only install too).
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
        return 0
    fi

    # Slow path, serialised. The lock lives in the repo (or beside the venv
    # when the repo is not writable).
    if command -v flock >/dev/null 2>&1; then
        for lock in "$REPO/.venv.lock" "$(dirname "$VENV")/.$(basename "$VENV").lock"; do
            if { exec {lockfd}>>"$lock"; } 2>/dev/null; then
                flock "$lockfd"
                break
            fi
            lockfd=""
        done
    fi
    # Another process may have finished the job while we waited.
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && _ith_venv_ok; then
        [ -n "$lockfd" ] && exec {lockfd}>&-
        return 0
    fi

    log="$VENV.bootstrap.log"
    { : >"$log"; } 2>/dev/null || log="$(mktemp "${TMPDIR:-/tmp}/ith-proxy-bootstrap.XXXXXX.log")"
    echo "ith-proxy: preparing virtualenv $VENV from $(basename "$req") (log: $log)" >&2
    {
        echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) bootstrap $req into $VENV"
    } >>"$log"

    if ! _ith_venv_ok; then
        local clear=""
        if [ -e "$VENV" ]; then
            # An unusable venv (e.g. its interpreter is gone) is recreated, but
            # only if it is a venv (or empty) and ours: never wipe anything else.
            if [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
                _ith_die "$VENV exists but is not a virtualenv; remove it or set ITH_PROXY_VENV"
            fi
            if [ ! -O "$VENV" ] || [ ! -w "$VENV" ]; then
                _ith_die "virtualenv $VENV is unusable for this user and not ours to recreate; remove it or set ITH_PROXY_VENV"
            fi
            clear="--clear"
        fi
        py="$(_ith_pick_python)" || exit 1
        echo "== $py -m venv $clear $VENV ($("$py" -V 2>&1))" >>"$log"
        "$py" -m venv $clear "$VENV" >>"$log" 2>&1 ||
            _ith_die "creating the virtualenv $VENV failed; see $log"
    fi

    echo "== pip install -r $req" >>"$log"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --no-input -r "$req" >>"$log" 2>&1 ||
        _ith_die "installing $(basename "$req") into $VENV failed; see $log"

    # Stamp this file and, since they were installed too, the files it includes.
    printf '%s\n' "$want" >"$stamp.tmp" && mv -f "$stamp.tmp" "$stamp"
    while read -r inc; do
        [ -n "$inc" ] || continue
        case "$inc" in /*) ;; *) inc="$(dirname "$req")/$inc" ;; esac
        [ -f "$inc" ] && _ith_req_hash "$inc" >"$VENV/.ith-stamp-$(basename "$inc")"
    done < <(_ith_included "$req")

    echo "== done" >>"$log"
    [ -n "$lockfd" ] && exec {lockfd}>&-
    return 0
}
