#!/usr/bin/env bash
# The CUDA benchmarks (or tests) under free-threaded Python on a GPU machine
# that has no network and no 3.14t: assemble 3.14t + torch 2.13.0 for cp314t
# from files carried there, lay the overlay on, run the CUDA workload benchmark
# or, with `pytest`, pytest from the repository's root.
#
#   benchmarks/run_cuda_ft.sh PY314T_TAR_XZ TORCH LIBNCCL_XZ [bench args...]
#   benchmarks/run_cuda_ft.sh PY314T_TAR_XZ TORCH LIBNCCL_XZ pytest [pytest args...]
#
# PY314T_TAR_XZ: a tar of a CPython 3.14t prefix made with absolute paths (as
#   scripts/bootstrap builds it: ~/.cache/torch-dist-threading/cpython-3.14.7t).
# TORCH: torch-2.13.0-cp314-cp314t-manylinux_2_28_x86_64.whl, or a .tar.xz of
#   site-packages entries as installed for 3.14t (torch, torchgen, functorch,
#   their dist-info; for `pytest` also numpy, pytest, expecttest, hypothesis
#   and theirs), which may be several tars concatenated.
# LIBNCCL_XZ: libnccl.so.2 from nvidia-nccl-cu13 2.29.7, xz-compressed.
# The machine's own python3 venv (torch for another Python) lends the other
# nvidia libraries and torch's pure-Python dependencies.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py_tar=$1 wheel=$2 nccl=$3
shift 3
site=${FT_SITE:-/tmp/ft-site}
host_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

tar -C / -xJf "$py_tar"
# (grep reads the whole listing: stopping early would kill tar and, with pipefail, us)
py=/$(tar -tJf "$py_tar" | grep -E 'bin/python3\.14t$' | sort | tail -n 1) \
    || { echo "error: no bin/python3.14t in $py_tar" >&2; exit 1; }
rm -rf "$site" && mkdir -p "$site"
if [[ $wheel == *.whl ]]; then
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$site"
else
    tar -C "$site" --ignore-zeros -xJf "$wheel"
fi
mkdir -p "$site/nvidia/nccl/lib"
xz -dc "$nccl" > "$site/nvidia/nccl/lib/libnccl.so.2"
for d in "$host_site"/nvidia/*; do
    [[ -e $site/nvidia/$(basename "$d") ]] || ln -s "$d" "$site/nvidia/$(basename "$d")"
done
# torch's pure-Python dependencies, borrowed; not the whole host site, whose
# compiled packages (numpy) are for another Python and fail to import.
for dep in typing_extensions.py sympy mpmath networkx fsspec filelock jinja2 packaging \
        setuptools pkg_resources _distutils_hack; do
    [[ -e $host_site/$dep && ! -e $site/$dep ]] && ln -s "$host_site/$dep" "$site/$dep"
done
export PYTHONPATH=$site PYTHON_GIL=0
"$py" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), "GIL", sys._is_gil_enabled())'
python3 "$here/../scripts/overlay" install --site "$site"
if [[ ${1:-} == pytest ]]; then
    shift
    cd "$here/.."
    exec "$py" -m pytest "$@"
fi
cd "$here"
exec "$py" bench_workload.py --device cuda "$@"
