"""Ship the Mooncake CUDA wheel to the offline device machine in carry-sized pieces.

    python tools/device_wheels.py [--version 0.3.13.post1] [--python 3.12] [--out .carry/mooncake-gpu]

Downloads ``mooncake-transfer-engine`` (no deps) for manylinux x86_64, keeps only what the store
needs (store/engine extensions, mooncake_master, the bundled shared libraries, the Python files),
packs that into a gzipped tar and splits it into parts below ``--part-mib`` (the device tool carries
at most 64 MiB per call; ignored paths already on the machine stay between calls). On the device::

    mkdir -p /tmp/mc && cat .carry/mooncake-gpu/part-* | tar xz -C /tmp/mc
    export LD_LIBRARY_PATH=$PWD/.carry/mooncake-gpu:$LD_LIBRARY_PATH
    export PYTHONPATH=/tmp/mc:$(ls .carry/mooncake-gpu/*.whl | tr '\\n' :)$PYTHONPATH
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# Big parts of the wheel the transfer store never loads (EP/PG collectives, benchmarks, duplicates).
DROP = re.compile(
    r"(transfer_engine_bench|mooncake_client$|libmooncake_pg|libmooncake_ep|/_ep\.|/pg_\d|"
    r"\.dist-info/)"
)


def download(version: str, python: str, dest: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux_2_28_x86_64", "--python-version", python,
         f"mooncake-transfer-engine=={version}", "-d", dest],
        check=True,
    )
    (whl,) = glob.glob(os.path.join(dest, "mooncake_transfer_engine-*.whl"))
    return whl


def trimmed_tar(whl: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(whl) as z, tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info in z.infolist():
            if info.is_dir() or DROP.search(info.filename):
                continue
            data = z.read(info)
            ti = tarfile.TarInfo(info.filename)
            ti.size = len(data)
            ti.mode = 0o755 if info.filename.endswith((".so", "mooncake_master")) or ".so." in info.filename else 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="0.3.13.post1")
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--out", default=".carry/mooncake-gpu")
    ap.add_argument("--part-mib", type=int, default=60)
    ap.add_argument("--extra", nargs="*", default=["cattrs"],
                    help="pure-Python wheels the device lacks (importable straight from the .whl on PYTHONPATH)")
    args = ap.parse_args()
    tmp2 = tempfile.mkdtemp()
    with tempfile.TemporaryDirectory() as tmp:
        blob = trimmed_tar(download(args.version, args.python, tmp))
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "part-*")):
        os.remove(old)
    step = args.part_mib << 20
    for i in range(0, len(blob), step):
        with open(os.path.join(args.out, f"part-{i // step:02d}"), "wb") as f:
            f.write(blob[i : i + step])
    # the CUDA wheel links libcudart.so.12; a CUDA-13 torch does not ship it (LD_LIBRARY_PATH it)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "--python-version", args.python, "nvidia-cuda-runtime-cu12", "-d", tmp2], check=True)
    for whl in glob.glob(os.path.join(tmp2, "*.whl")):
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if re.search(r"lib/libcudart\.so\.12$", name):
                    with open(os.path.join(args.out, "libcudart.so.12"), "wb") as f:
                        f.write(z.read(name))
    for req in args.extra:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", req,
                        "-d", args.out], check=True)
    print(f"{len(blob) / 2**20:.1f} MiB in {(len(blob) + step - 1) // step} part(s) under {args.out}")


if __name__ == "__main__":
    main()
