# Shared helpers for the shell scripts in this folder. Source, don't run.
TDT_CACHE=${TDT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torch-dist-threading}

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Python of a bootstrapped environment: env_python gil|ft
env_python() { printf '%s\n' "$TDT_CACHE/env-$1/bin/python"; }
