"""data.atomic: the one atomic-write helper (a file or folder appears whole or not at all)."""

import json
import threading

import pytest

from data.atomic import replacing, replacing_dir, write_json


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "record.json"
    write_json(target, {"a": 1}, indent=2)
    assert json.loads(target.read_text()) == {"a": 1} and target.read_text().endswith("\n")
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "chart.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # a format picked by suffix still works
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    """The calibration record once used one fixed temporary name, so two writers could rename each
    other's half-written file into place; now every write has its own."""
    target = tmp_path / "calibration.json"
    texts = [json.dumps({"writer": i, "pad": "x" * 200_000}) for i in range(8)]
    errors = []

    def write(text):
        try:
            for _ in range(5):
                with replacing(target) as tmp:
                    with tmp.open("w") as f:
                        f.write(text[:100_000])
                        f.flush()
                        f.write(text[100_000:])
        except Exception as exc:  # a vanished temporary: two writers shared a name
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]


def test_replacing_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(OSError), replacing_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty folder is replaced
    with replacing_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"] and out.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
