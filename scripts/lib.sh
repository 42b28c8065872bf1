# Shared helpers for the shell scripts in this folder. Source, don't run.
TDT_CACHE=${TDT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torch-dist-threading}

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# logged LOG CMD...: run CMD with its output appended to LOG instead of the
# terminal. On failure, print the command, LOG's path and its last lines to
# stderr, and return CMD's status (the caller says what failed, with die).
logged() {
    local log=$1 status=0
    shift
    printf '\n$ %s\n' "$*" >>"$log"
    "$@" >>"$log" 2>&1 </dev/null || status=$?
    if ((status != 0)); then
        printf 'error: `%s` exited with status %d; last lines of %s:\n' "$*" "$status" "$log" >&2
        tail -n 25 "$log" | sed 's/^/    /' >&2
    fi
    return "$status"
}

# Python of a bootstrapped environment: env_python gil|ft
env_python() { printf '%s\n' "$TDT_CACHE/env-$1/bin/python"; }
