"""MANIFEST.json written and verified by every rank at once (4 real gloo processes): each file's
bytes are hashed by exactly one rank, the shares are balanced, the manifest equals sha256
computed here with hashlib, and a flipped bit in any rank's share is found by every rank.
Without a process group: the manifest covers every file (one it does not list is a problem
naming it), and leftovers of interrupted writes are never listed and are removed."""

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


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_file_the_manifest_does_not_list_is_a_problem_naming_it(tmp_path):
    """A flipped bit in a file whose entry was taken out of the manifest, or under a manifest
    edited to list nothing, is not loaded: the file is named, as a changed byte is."""
    _files(tmp_path)
    checkpointing.write_manifest(tmp_path)
    (tmp_path / checkpointing.COMPLETE_MARKER).write_text("{}")
    path = tmp_path / checkpointing.MANIFEST
    manifest = json.loads(path.read_text())
    _flip(tmp_path / "b.distcp")
    del manifest["files"]["b.distcp"]
    path.write_text(json.dumps(manifest))
    unlisted = "is not listed in its MANIFEST.json, so its bytes cannot be checked"
    assert checkpointing.manifest_problem(tmp_path) == f"{tmp_path / 'b.distcp'} {unlisted}"

    path.write_text(json.dumps({**manifest, "files": {}}))
    assert checkpointing.manifest_problem(tmp_path) == f"{tmp_path / '.metadata'} {unlisted}"

    checkpointing.write_manifest(tmp_path)
    (tmp_path / "sub" / "extra.distcp").write_bytes(b"late")
    assert checkpointing.manifest_problem(tmp_path) == (
        f"{tmp_path / 'sub' / 'extra.distcp'} {unlisted}")


LEFTOVERS = ["MANIFEST.json.partial", "COMPLETE.partial", "latest.partial", ".metadata.tmp",
             "sub/__1.metadata.tmp", ".disk-probe.partial"]


def test_leftovers_of_interrupted_writes_are_never_listed_and_are_removed(tmp_path):
    """A kill inside the MANIFEST.json write of a DeepSpeed tag leaves MANIFEST.json.partial;
    the next save of that tag wrote a manifest listing it, then renamed it away, and the good
    tag was reported corrupt. Writing the manifest removes leftovers; checking one ignores a
    leftover that appears later and skips an entry naming one (older manifests list them)."""
    _files(tmp_path)
    for name in LEFTOVERS:
        (tmp_path / name).write_bytes(b"torn")
    checkpointing.write_manifest(tmp_path)
    manifest = json.loads((tmp_path / checkpointing.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(SIZES)
    assert not [name for name in LEFTOVERS if (tmp_path / name).exists()]
    assert checkpointing.manifest_problem(tmp_path) is None

    for name in LEFTOVERS:
        (tmp_path / name).write_bytes(b"torn again")
    manifest["files"]["MANIFEST.json.partial"] = {"size": 1, "sha256": "0" * 64}
    (tmp_path / checkpointing.MANIFEST).write_text(json.dumps(manifest))
    assert checkpointing.manifest_problem(tmp_path) is None

