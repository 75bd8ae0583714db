"""Fault injection for atomic outputs (`--overwrite`): the old output survives every failure."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_qap import atomic
from optimum_qap.atomic import OutputError, atomic_output, recover_leftovers


def old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("old weights")
    return target


def write_new(folder):
    (folder / "model.safetensors").write_text("new weights")
    (folder / "config.json").write_text("{}")


def listing(path):
    return sorted(p.name for p in path.iterdir())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_success_replaces_the_folder_and_leaves_nothing_else(tmp_path):
    target = old_folder(tmp_path)
    with atomic_output(target, folder=True) as temporary:
        write_new(temporary)
    assert listing(tmp_path) == ["out"] and (target / "model.safetensors").read_text() == "new weights"


def test_failure_while_writing_keeps_the_old_folder(tmp_path):
    target = old_folder(tmp_path)
    with pytest.raises(RuntimeError), atomic_output(target, folder=True) as temporary:
        write_new(temporary)
        raise RuntimeError("killed while saving")
    assert listing(tmp_path) == ["out"] and (target / "model.safetensors").read_text() == "old weights"


def test_failing_rename_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    real_replace = os.replace

    def replace(source, destination):
        if ".tmp-" in str(source):
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space"), atomic_output(target, folder=True) as temporary:
        write_new(temporary)
    assert listing(tmp_path) == ["out"] and (target / "model.safetensors").read_text() == "old weights"


def test_old_folder_that_fails_to_delete_half_way_does_not_touch_the_new_one(tmp_path, monkeypatch):
    target = old_folder(tmp_path)
    (target / "second").write_text("x")
    real_remove = atomic._remove

    def remove_one_file(path):
        if ".old-" in path.name:
            (path / "second").unlink()  # then "fails": the rest stays
            return
        real_remove(path)

    monkeypatch.setattr(atomic, "_remove", remove_one_file)
    with atomic_output(target, folder=True) as temporary:
        write_new(temporary)
    assert (target / "model.safetensors").read_text() == "new weights"
    leftover = next(p for p in tmp_path.iterdir() if ".old-" in p.name)
    stale = tmp_path / f".out.old-{dead_pid()}"
    leftover.rename(stale)  # as if left by a run that is gone
    monkeypatch.setattr(atomic, "_remove", real_remove)
    recover_leftovers(target)
    assert listing(tmp_path) == ["out"] and (target / "model.safetensors").read_text() == "new weights"


def test_a_crash_between_the_renames_is_undone_by_the_next_run(tmp_path):
    target = old_folder(tmp_path)
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from optimum_qap import atomic
        real = os.replace
        def replace(source, destination):
            if ".tmp-" in str(source):
                os._exit(9)  # killed after the old folder was moved aside, before the new one moved in
            real(source, destination)
        atomic.os.replace = replace
        with atomic.atomic_output(Path({str(target)!r}), folder=True) as temporary:
            (temporary / "model.safetensors").write_text("new weights")
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert not target.exists()  # the old folder is aside, under .out.old-PID
    recover_leftovers(target)
    assert listing(tmp_path) == ["out"] and (target / "model.safetensors").read_text() == "old weights"


def test_leftover_temporaries_of_killed_runs_are_removed(tmp_path):
    target = old_folder(tmp_path)
    pid = dead_pid()
    (tmp_path / f".out.tmp-{pid}").mkdir()
    (tmp_path / f".out.old-{pid}").mkdir()  # the target exists: this old copy is obsolete
    (tmp_path / f".other.tmp-{pid}").mkdir()  # another target's: not ours to touch
    with atomic_output(target, folder=True) as temporary:
        write_new(temporary)
    assert listing(tmp_path) == [f".other.tmp-{pid}", "out"]


def test_files_are_replaced_atomically(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_output(target) as temporary:
        temporary.write_text("half")
        raise ValueError
    assert target.read_text() == "old" and listing(tmp_path) == ["results.json"]
    with atomic_output(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and listing(tmp_path) == ["results.json"]


def test_an_unwritable_location_names_the_output_not_the_temporary():
    target = Path("/proc/qap-out")  # /proc takes no new entries, even from root
    with pytest.raises(OutputError, match=r"^cannot write /proc/qap-out: ") as error, atomic_output(target, True):
        pass
    assert ".tmp-" not in str(error.value)
