"""imet.files.sha256_file against published SHA-256 test vectors (FIPS 180-2), across its 1 MiB read blocks."""

from __future__ import annotations

import hashlib

import pytest

from imet.errors import ImetError
from imet.files import check_free_space, check_replaceable, sha256_file


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


def test_library_refusals_name_the_path_and_no_option(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ImetError, match=r"^\S+: exists and holds files imet did not write; choose a new or empty"):
        check_replaceable(tmp_path)
    with pytest.raises(ImetError, match=r"^\S+/s\.h5: needs .* MiB more disk space, .*; free some space or choose "
                                        r"another path$"):
        check_free_space(tmp_path / "s.h5", 1 << 62)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
