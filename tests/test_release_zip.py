"""The released model committed in models/: the zip matches its committed checksum file, and a corrupted or
truncated copy is refused by the zip check (``release.check_zip``, what the demo runs before installing it)."""
import hashlib
import os
import shutil

import pytest

from nnunet_diffusion.release import ChecksumError, check_zip

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
ZIP = os.path.join(MODELS, "Dataset004_Hippocampus_DiffusionTrainer.zip")


def sha256_of(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def committed_checksum() -> str:
    """The ``sha256sum -c`` line of the committed .sha256 file: digest and the zip's file name."""
    digest, name = open(ZIP + ".sha256").read().split()
    assert name == os.path.basename(ZIP)
    return digest


def test_committed_zip_matches_committed_checksum():
    expected = committed_checksum()
    assert len(expected) == 64
    assert sha256_of(ZIP) == expected  # hashlib over the whole file, independently of release.py
    assert check_zip(ZIP) == expected  # the .sha256 beside the zip
    assert check_zip(ZIP, expected) == expected


@pytest.fixture
def copy_of_release(tmp_path):
    """The released zip and its .sha256, copied (the committed files stay untouched)."""
    path = tmp_path / os.path.basename(ZIP)
    shutil.copy(ZIP, path)
    shutil.copy(ZIP + ".sha256", str(path) + ".sha256")
    return str(path)


def test_one_changed_byte_is_refused(copy_of_release):
    size = os.path.getsize(copy_of_release)
    with open(copy_of_release, "r+b") as f:  # one bit, in the middle of the stored checkpoint
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    found = sha256_of(copy_of_release)
    expected = committed_checksum()
    assert found != expected
    with pytest.raises(ChecksumError) as refused:
        check_zip(copy_of_release)
    message = str(refused.value)
    assert "corrupted" in message and found in message and expected in message
    with pytest.raises(ChecksumError, match="corrupted"):
        check_zip(copy_of_release, expected)  # the digest given on the command line instead of the file


def test_truncated_copy_is_refused(copy_of_release):
    """A download cut short: the zip minus its last kilobyte."""
    data = open(copy_of_release, "rb").read()
    open(copy_of_release, "wb").write(data[:-1024])
    with pytest.raises(ChecksumError, match="corrupted"):
        check_zip(copy_of_release)


def test_missing_checksum_file_is_an_error(copy_of_release):
    os.remove(copy_of_release + ".sha256")
    with pytest.raises(FileNotFoundError, match="no checksum given"):
        check_zip(copy_of_release)
