"""Atomic artifact writes: complete or absent, new folders made, unwritable paths and full disks in one line."""
import errno

import pytest
import torch

from medclf import atomic
from medclf.cli import main
from medclf.errors import MedclfError

from conftest import make_split_folder


def test_write_creates_a_missing_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "deeper" / "plan.yaml"
    atomic.write_text(target, "a: 1\n")
    assert target.read_text() == "a: 1\n" and sorted(p.name for p in target.parent.iterdir()) == ["plan.yaml"]


def test_unwritable_paths_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(MedclfError, match="cannot write .*afile/x.json") as under_a_file:
        atomic.write_text(tmp_path / "afile" / "x.json", "{}")
    (tmp_path / "adir").mkdir()
    with pytest.raises(MedclfError, match="it is a folder") as onto_a_folder:
        atomic.write_text(tmp_path / "adir", "{}")
    assert "\n" not in str(under_a_file.value) + str(onto_a_folder.value)
    assert (tmp_path / "afile").read_text() == "keep" and list((tmp_path / "adir").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temporary left behind


def test_a_full_disk_names_the_file_and_the_space_needed(tmp_path, monkeypatch):
    def no_space(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    target = tmp_path / "model.pt"
    with pytest.raises(MedclfError) as full:
        atomic.torch_save({"w": torch.zeros(1000, 1000)}, target)
    assert str(full.value).startswith(f"disk full writing {target}") and "about 4.0 MB needed" in str(full.value)
    assert list(tmp_path.iterdir()) == []


def test_plan_out_into_a_new_folder(tmp_path, capsys):
    data = make_split_folder(tmp_path / "xray")
    out = tmp_path / "plans" / "chest" / "plan.yaml"
    assert main(["plan", str(data), "--no-probe", "--out", str(out)]) == 0
    assert out.is_file() and "settings:" in out.read_text()
    blocked = tmp_path / "plans" / "chest" / "plan.yaml" / "x.yaml"  # under a file
    assert main(["plan", str(data), "--no-probe", "--out", str(blocked)]) == 2
    assert capsys.readouterr().err.strip().startswith("medclf: error: cannot write")
