"""Output paths are checked before any work, and the checks create nothing."""

import os

import pytest

from data.errors import UserError
from data.paths import check_existing_dir, check_output_dir, check_output_file

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def test_creatable_paths_pass_and_nothing_is_created(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "--out")
    check_output_file(tmp_path / "new" / "chart.png", "--chart")
    assert check_existing_dir(tmp_path, "--workdir") == tmp_path.resolve()
    assert list(tmp_path.iterdir()) == []


def test_paths_under_a_regular_file_are_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--out .*is a file, not a folder"):
        check_output_dir(tmp_path / "a-file", "--out")
    with pytest.raises(UserError, match="cannot be created: .*a-file is a file"):
        check_output_dir(tmp_path / "a-file" / "report", "--out")
    with pytest.raises(UserError, match="cannot be created"):
        check_output_file(tmp_path / "a-file" / "chart.png", "--chart")
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, "--chart")


def test_a_missing_workdir_is_refused_not_created(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_existing_dir(tmp_path / "typo", "--workdir")
    assert not (tmp_path / "typo").exists()


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders")
def test_read_only_folders_are_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="read-only"):
        check_output_dir(locked / "report", "--out")
    with pytest.raises(UserError, match="read-only"):
        check_output_file(locked / "chart.png", "--chart")


def test_what_access_denies_is_refused_even_as_root(tmp_path, monkeypatch):
    """The read-only branch as root (who may write anywhere): the check asks os.access, as the
    kernel would answer a regular user."""
    monkeypatch.setattr("data.paths.os.access", lambda path, mode: False)
    with pytest.raises(UserError, match="read-only for this user"):
        check_output_dir(tmp_path / "report", "--out")
    with pytest.raises(UserError, match="read-only"):
        check_existing_dir(tmp_path, "--workdir")
