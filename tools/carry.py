"""Files larger than one device call can carry, moved in fixed-size chunks and checked on arrival.

The lent GPU machine takes at most 64 MiB of working tree a call (the SmolLM2 GGUF alone is 98 MB,
Gemma 3 270M's 238 MB). ``pack`` concatenates files into one stream cut into chunks, each in its own
folder (``carry`` names one per call) with a manifest of every file's offset, size and sha256.
``add`` on the device machine writes a chunk at its offset into a stage folder and extracts every
file whose bytes have all arrived, after checking its sha256; a file that does not match is
refused, never extracted. Chunks may arrive in any order; adding one twice is harmless.

    python tools/carry.py pack --out .carry/chunks --chunk-mb 59 a.gguf quality.tar sharegpt.jsonl.xz
    # each device call:  python3 tools/carry.py add .carry/chunks/c03 --stage /tmp/stage
    # files land in /tmp/stage/files/<name> (a background job there waits for them)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def _sha256(path: Path, offset: int = 0, size: int = -1) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size >= 0 else os.path.getsize(path) - offset
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def pack(files: list[Path], out: Path, chunk_bytes: int) -> dict:
    """Chunks ``out/cNN/chunk`` of the files' concatenation, each folder with the manifest."""
    entries, offset = [], 0
    for f in files:
        size = f.stat().st_size
        entries.append({"name": f.name, "offset": offset, "size": size, "sha256": _sha256(f)})
        offset += size
    n_chunks = (offset + chunk_bytes - 1) // chunk_bytes
    manifest = {"chunk_bytes": chunk_bytes, "total_bytes": offset, "chunks": n_chunks, "files": entries}
    if out.exists():
        shutil.rmtree(out)
    streams = iter(files)
    current = open(next(streams), "rb")
    for c in range(n_chunks):
        folder = out / f"c{c:02d}"
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        left = min(chunk_bytes, offset - c * chunk_bytes)
        with open(folder / "chunk", "wb") as g:
            while left > 0:
                block = current.read(min(left, 1 << 22))
                if not block:
                    current.close()
                    current = open(next(streams), "rb")
                    continue
                g.write(block)
                left -= len(block)
    current.close()
    return manifest


def add(chunk_dir: Path, stage: Path) -> list[str]:
    """Write one chunk into ``stage/blob``; extract the files now complete. Returns their names."""
    manifest = json.loads((chunk_dir / MANIFEST).read_text())
    c = int(chunk_dir.name.lstrip("c"))
    stage.mkdir(parents=True, exist_ok=True)
    known = stage / MANIFEST
    if known.is_file() and json.loads(known.read_text()) != manifest:
        raise SystemExit(f"{chunk_dir}: its manifest differs from {known} (chunks of another pack); "
                         f"empty {stage} first")
    known.write_text(json.dumps(manifest, indent=1) + "\n")
    blob = stage / "blob"
    mode = "r+b" if blob.is_file() else "w+b"
    with open(blob, mode) as f:
        f.seek(c * manifest["chunk_bytes"])
        with open(chunk_dir / "chunk", "rb") as g:
            shutil.copyfileobj(g, f, 1 << 22)
    (stage / f"have-{c:02d}").touch()
    have = {int(p.name[5:]) for p in stage.glob("have-*")}
    extracted = []
    for e in manifest["files"]:
        first = e["offset"] // manifest["chunk_bytes"]
        last = (e["offset"] + max(e["size"], 1) - 1) // manifest["chunk_bytes"]
        dest = stage / "files" / e["name"]
        if dest.is_file() or not all(i in have for i in range(first, last + 1)):
            continue
        got = _sha256(blob, e["offset"], e["size"])
        if got != e["sha256"]:
            raise SystemExit(f"{e['name']}: sha256 {got} of the arrived bytes, manifest says {e['sha256']}; "
                             f"not extracted")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        with open(blob, "rb") as f, open(tmp, "wb") as g:
            f.seek(e["offset"])
            left = e["size"]
            while left > 0:
                block = f.read(min(left, 1 << 22))
                g.write(block)
                left -= len(block)
        tmp.replace(dest)  # a waiting job sees the file only once it is whole
        extracted.append(e["name"])
    return extracted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-mb", type=float, default=59.0)
    a = sub.add_parser("add")
    a.add_argument("chunk", type=Path)
    a.add_argument("--stage", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.files, args.out, int(args.chunk_mb * 1e6))
        for e in m["files"]:
            first, last = e["offset"] // m["chunk_bytes"], (e["offset"] + e["size"] - 1) // m["chunk_bytes"]
            print(f"{e['name']}: {e['size']} bytes, chunks c{first:02d}..c{last:02d}")
        return 0
    done = add(args.chunk, args.stage)
    print(f"{args.chunk}: added; extracted {done or 'nothing new'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
