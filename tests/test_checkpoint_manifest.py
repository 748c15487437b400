"""MANIFEST.json written and verified by every rank at once (4 real gloo processes): each file's
bytes are hashed by exactly one rank, the shares are balanced, the manifest equals sha256
computed here with hashlib, and a flipped bit in any rank's share is found by every rank."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

from token_objectives.training import checkpointing

SIZES = {"a.distcp": 900_000, "b.distcp": 700_000, "c.distcp": 650_000, "d.distcp": 400_000,
         "sub/common.pt": 120_000, "sub/metadata": 3_000, ".metadata": 2_000}


def _files(root: Path) -> None:
    for offset, (name, size) in enumerate(SIZES.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((offset + i) % 251 for i in range(size)))


def _write_and_verify(root: str) -> dict:
    root = Path(root)
    if dist.get_rank() == 0:
        _files(root)
    dist.barrier()
    hashed = []
    original = checkpointing._digest

    def counting(path):
        hashed.append(Path(path).relative_to(root).as_posix())
        return original(path)

    checkpointing._digest = counting
    try:
        checkpointing.write_manifest(root)
        wrote = list(hashed)
        hashed.clear()
        clean = checkpointing.agreed_problem(root)
        verified = list(hashed)
        dist.barrier()
        if dist.get_rank() == 0:  # a bit of the 2nd-largest file: rank 1's
            data = bytearray((root / "b.distcp").read_bytes())
            data[12345] ^= 0x10
            (root / "b.distcp").write_bytes(bytes(data))
        dist.barrier()
        flipped = checkpointing.agreed_problem(root)
    finally:
        checkpointing._digest = original
    return {"wrote": wrote, "verified": verified, "clean": clean, "flipped": flipped}


def test_every_rank_hashes_a_share_and_finds_a_flipped_bit(pool4, tmp_path):
    results = pool4.run(_write_and_verify, str(tmp_path))
    manifest = json.loads((tmp_path / checkpointing.MANIFEST).read_text())
    _files(tmp_path / "expected")
    expected = {name: {"size": size, "sha256": hashlib.sha256(
        (tmp_path / "expected" / name).read_bytes()).hexdigest()} for name, size in SIZES.items()}
    assert manifest["files"] == expected

    shares = [result["wrote"] for result in results]
    assert sorted(name for share in shares for name in share) == sorted(SIZES)  # once each
    assert all(share for share in shares)  # every rank does some of the work
    loads = [sum(SIZES[name] for name in share) for share in shares]
    assert max(loads) <= sum(SIZES.values()) / 4 + max(SIZES.values()) / 2, loads
    assert [sorted(r["verified"]) for r in results] == [sorted(share) for share in shares]

    flipped = str(tmp_path / "b.distcp")
    for result in results:
        assert result["clean"] is None
        assert result["flipped"] == f"{flipped} does not match its sha256 in MANIFEST.json"
    assert os.path.getsize(flipped) == SIZES["b.distcp"]
