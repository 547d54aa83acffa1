#!/bin/bash
# Ship Ray core to the offline device machine inside the 64 MiB carry limit.
#
#   tools/carry_ray.sh [PY=3.12] [OUT=.carry/ray]
#
# The ray 2.60.0 manylinux wheel is ~79 MB; the Java jar, the dashboard's web client, the
# libraries (serve, rllib, tune, train, data, air, llm), tests and stubs are never loaded by
# specforge's pipeline (actors, placement groups, object store). What is left (_raylet.so,
# gcs_server, raylet, the Python core) is tarred+gzipped into $OUT/ray.tgz (~33 MiB).
# jsonschema and its deps (ray imports it; the image lacks it) go beside it as wheels. On the device:
#
#   mkdir -p /tmp/site && tar xzf .carry/ray/ray.tgz -C /tmp/site &&
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/ray/*.whl &&
#   export PYTHONPATH=/tmp/site
#
# Note: Ray puts the driver's working directory first on every worker's sys.path, so to run a code
# snapshot (e.g. `git archive HEAD` into .carry/head) `cd` into it; PYTHONPATH alone only moves the driver.
set -euo pipefail
PY=${1:-3.12}
OUT=${2:-.carry/ray}
VER=2.60.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "$PY" = "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/whl" "ray==$VER"
else
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux2014_x86_64 -d "$tmp/whl" "ray==$VER"
fi
mkdir -p "$tmp/site"
python3 - "$tmp/whl"/ray-*.whl "$tmp/site" <<'EOF'
import re, sys, zipfile
DROP = re.compile(
    r"^ray/(jars|dashboard/client|serve|rllib|tune|train|data|air|llm|tests|util/dask|util/spark|.*/tests?/)|"
    r"\.pyi$|\.js\.map$"
)
whl, dest = sys.argv[1:]
kept = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.is_dir() or DROP.search(info.filename):
            continue
        path = z.extract(info, dest)
        mode = info.external_attr >> 16
        if mode:
            import os; os.chmod(path, mode & 0o777)
        kept += info.file_size
print(f"kept {kept / 2**20:.1f} MiB uncompressed")
EOF
# the binaries must be executable whatever the zip recorded
chmod +x "$tmp/site/ray/core/src/ray/gcs/gcs_server" "$tmp/site/ray/core/src/ray/raylet/raylet"
mkdir -p "$OUT"
# ray imports jsonschema at import time; the image lacks it and its deps (attrs is there)
if [ "$PY" = "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" ]; then
  plat=()
else
  plat=(--python-version "$PY" --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fi
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$OUT" \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
tar czf "$OUT/ray.tgz" -C "$tmp/site" .
du -h "$OUT/ray.tgz"
