"""imet.files.sha256_file against published SHA-256 test vectors (FIPS 180-2), across its 1 MiB read blocks."""

from __future__ import annotations

import hashlib

import pytest

from imet.files import sha256_file


@pytest.mark.parametrize(("data", "digest"), [
    (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
    (b"a" * (1 << 20) * 2 + b"a" * 3, None),  # spans three blocks: must equal hashing the bytes at once
])
def test_sha256_file(tmp_path, data, digest):
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    if digest is None:
        digest = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == digest
