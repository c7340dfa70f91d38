import pytest

from mimic_toolkit.atomic import atomic_file, atomic_folder, write_file
from mimic_toolkit.errors import UserError


def test_a_failure_mid_write_leaves_neither_the_file_nor_debris(tmp_path):
    target = tmp_path / "out" / "data.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as partial:
            partial.write_text("half")
            raise RuntimeError("interrupted")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failure_mid_write_keeps_the_previous_file(tmp_path):
    target = write_file(tmp_path / "data.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as partial:
            partial.write_bytes(b"ne")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_new_refuses_an_existing_file_and_leaves_it_alone(tmp_path):
    target = write_file(tmp_path / "rows.jsonl", "first\n", new="--out")
    with pytest.raises(UserError, match=r"already exists; choose another --out"):
        write_file(target, "second\n", new="--out")
    assert target.read_text() == "first\n"


def test_a_folder_appears_only_when_complete(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as folder:
            (folder / "a.txt").write_text("a")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as folder:
        assert folder.name == "set.partial"
        (folder / "a.txt").write_text("a")
    with atomic_folder(target, replace=True) as folder:
        (folder / "b.txt").write_text("b")
    assert [p.name for p in tmp_path.iterdir()] == ["set"] and [p.name for p in target.iterdir()] == ["b.txt"]


def test_long_work_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    from mimic_toolkit.atomic import check_replaceable

    ours = lambda folder: (folder / "training.json").is_file()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="holds files this command did not write"):
        check_replaceable(tmp_path / "home", ours, "--out")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "training.json").write_text("{}")
    check_replaceable(tmp_path / "old", ours, "--out")  # a previous output of the same command
    check_replaceable(tmp_path / "new", ours, "--out")  # nothing there yet
