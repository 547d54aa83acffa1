"""tools/carry.py: files cut into chunks arrive in any order and come out byte-equal; a damaged
chunk is refused (the file is not extracted), never passed on."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("carry", Path(__file__).resolve().parents[1] / "tools" / "carry.py")
carry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(carry)


def _files(tmp_path: Path) -> list[Path]:
    sizes = {"a.bin": 2500, "b.bin": 10, "c.bin": 7001, "empty.bin": 0}
    out = []
    for name, size in sizes.items():
        p = tmp_path / "src" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


def test_chunks_in_any_order_rebuild_every_file(tmp_path: Path) -> None:
    files = _files(tmp_path)
    m = carry.pack(files, tmp_path / "chunks", chunk_bytes=1000)
    assert m["chunks"] == 10  # 9511 bytes
    stage = tmp_path / "stage"
    seen: list[str] = []
    for c in [9, 3, 0, 1, 2, 5, 4, 8, 7, 6, 3]:  # out of order, one twice
        seen += carry.add(tmp_path / "chunks" / f"c{c:02d}", stage)
    assert sorted(seen) == sorted(f.name for f in files)
    for f in files:
        assert (stage / "files" / f.name).read_bytes() == f.read_bytes()


def test_a_file_is_extracted_once_its_chunks_are_all_there(tmp_path: Path) -> None:
    files = _files(tmp_path)
    carry.pack(files, tmp_path / "chunks", chunk_bytes=1000)
    stage = tmp_path / "stage"
    assert carry.add(tmp_path / "chunks" / "c00", stage) == []  # a.bin is bytes 0..2499
    assert carry.add(tmp_path / "chunks" / "c01", stage) == []
    assert carry.add(tmp_path / "chunks" / "c02", stage) == ["a.bin", "b.bin"]


def test_damaged_chunk_is_refused(tmp_path: Path) -> None:
    files = _files(tmp_path)
    carry.pack(files, tmp_path / "chunks", chunk_bytes=1000)
    chunk = tmp_path / "chunks" / "c00" / "chunk"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0xFF
    chunk.write_bytes(bytes(data))
    stage = tmp_path / "stage"
    carry.add(tmp_path / "chunks" / "c00", stage)  # a.bin spans c00..c02
    carry.add(tmp_path / "chunks" / "c01", stage)
    with pytest.raises(SystemExit, match="a.bin: sha256"):
        carry.add(tmp_path / "chunks" / "c02", stage)
    assert not (stage / "files" / "a.bin").exists()


def test_chunks_of_another_pack_are_refused(tmp_path: Path) -> None:
    files = _files(tmp_path)
    carry.pack(files, tmp_path / "one", chunk_bytes=1000)
    carry.pack(files[:2], tmp_path / "two", chunk_bytes=1000)
    stage = tmp_path / "stage"
    carry.add(tmp_path / "one" / "c00", stage)
    with pytest.raises(SystemExit, match="manifest differs"):
        carry.add(tmp_path / "two" / "c00", stage)
