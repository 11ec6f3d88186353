"""Checksums of shipped weight files: a corrupted tensor with an intact safetensors header loads without error
and gives wrong numbers, so the build records a sha256 of every weight file in the folder's ``measured.json``
(key ``sha256``: {relative path: hex digest}) and loading verifies it.

    record_checksums(folder)      # after save_pretrained (tasks/toy/train.build calls it); updates measured.json
    verify_checksums(folder)      # before from_pretrained (tasks.models.load_pipeline); WeightsChecksumError

A folder without ``measured.json`` or without its ``sha256`` key (a user's own save_pretrained folder, a hub
snapshot) is not checked: the hub's own file hashes cover downloads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MEASURED = "measured.json"
KEY = "sha256"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class WeightsChecksumError(OSError):
    """A weight file differs from the sha256 recorded when it was built (corrupted, truncated, replaced)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files under a pipeline folder (sorted, relative to it)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def checksums(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    return {p.as_posix(): file_sha256(folder / p) for p in weight_files(folder)}


def record_checksums(folder: str | Path) -> dict[str, str]:
    """Write the sha256 of every weight file into ``<folder>/measured.json`` (other keys kept); returns them."""
    folder = Path(folder)
    path = folder / MEASURED
    entry = json.loads(path.read_text()) if path.is_file() else {}
    entry[KEY] = checksums(folder)
    path.write_text(json.dumps(entry, indent=2) + "\n")
    return entry[KEY]


def verify_checksums(folder: str | Path, *, fix: str = "") -> int:
    """Raise WeightsChecksumError (one line: the file, both digests' prefixes, `fix`) when a weight file recorded in
    ``measured.json`` is missing or differs; returns the number of files checked (0: nothing recorded)."""
    folder = Path(folder)
    path = folder / MEASURED
    if not path.is_file():
        return 0
    try:
        recorded = json.loads(path.read_text()).get(KEY) or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise WeightsChecksumError(f"{path} is not valid JSON ({err}); {fix or 'restore it from git'}") from None
    for rel, want in recorded.items():
        file = folder / rel
        if not file.is_file():
            raise WeightsChecksumError(f"weight file {file} is missing (recorded in {path}); {fix or 'restore it'}")
        got = file_sha256(file)
        if got != want:
            raise WeightsChecksumError(f"weight file {file} is corrupted: sha256 {got[:12]}... != {want[:12]}... "
                                       f"recorded in {path}; {fix or 'restore it'}")
    return len(recorded)
