"""Kaggle datasets: kagglehub's real download path against a loopback server, and the two Kaggle layouts
(COVID-19 Radiography Database, Kermany chest X-ray) training as they come, on small fake copies."""
import csv
import functools
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medclf.cli import main
from medclf.data import kaggle, layouts, sources
from medclf.errors import MedclfError

from conftest import FAST_FLAGS, make_image

COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def write_covid_layout(root: Path, per_class: int = 10) -> Path:
    """COVID-19_Radiography_Dataset/<class>/{images,masks}/<class>-<i>.png, metadata beside them, as Kaggle ships it."""
    data = root / "COVID-19_Radiography_Dataset"
    rng = np.random.default_rng(0)
    for c, name in enumerate(COVID_CLASSES):
        for sub in ("images", "masks"):
            (data / name / sub).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(make_image(c % 3, 16, rng)).save(data / name / "images" / f"{name}-{i + 1}.png")
            mask = np.zeros((16, 16), np.uint8)
            mask[4:12, 2:7] = mask[4:12, 9:14] = 255  # two lungs: unlike any image
            Image.fromarray(mask).save(data / name / "masks" / f"{name}-{i + 1}.png")
        (data / f"{name}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (data / "README.md.txt").write_text("COVID-19 Radiography Database\n")
    return root


def _kermany_names(label: str, patient: int) -> list[str]:
    if label == "NORMAL":
        return [f"IM-{patient:04d}-0001.jpeg", f"IM-{patient:04d}-0002-0001.jpeg"]
    return [f"person{patient}_bacteria_{2 * patient}.jpeg", f"person{patient}_virus_{2 * patient + 1}.jpeg"]


def write_kermany_layout(root: Path, train_patients: int = 20) -> Path:
    """archive/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA} with two images per patient (one in the tiny val:
    one patient per class), a nested duplicate chest_xray/chest_xray and __MACOSX folders, as some Kaggle copies have."""
    rng = np.random.default_rng(1)
    counts = {"train": train_patients, "val": 1, "test": 3}
    patient = 0
    for split, n in counts.items():
        for c, label in enumerate(("NORMAL", "PNEUMONIA")):
            for copy in ("chest_xray", "chest_xray/chest_xray"):
                (root / copy / split / label).mkdir(parents=True)
            for _ in range(n):
                patient += 1
                for name in _kermany_names(label, patient)[:1 if split == "val" else 2]:
                    img = Image.fromarray(make_image(c, 16, rng))
                    img.save(root / "chest_xray" / split / label / name)
                    img.save(root / "chest_xray" / "chest_xray" / split / label / name)
    junk = root / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    junk.mkdir(parents=True)
    (junk / "._IM-0001-0001.jpeg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "chest_xray" / "__MACOSX").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "chest_xray" / "__MACOSX" / "stray.jpeg")
    return root


def read_splits(run: Path) -> list[dict]:
    with open(run / "splits.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- layouts

def test_covid_layout_trains_without_masks(tmp_path, capsys):
    data = write_covid_layout(tmp_path / "covid")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--size", "16", "--out", str(run)]) == 0
    rows = read_splits(run)
    assert len(rows) == 4 * 10  # every image once, no mask, no spreadsheet
    assert all(Path(r["id"]).parent.name == "images" for r in rows)
    assert {r["label"] for r in rows} == set(COVID_CLASSES)
    per_split = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert per_split == {"train": 32, "val": 4, "test": 4}  # 80/10/10, stratified
    assert "4 mask folder(s) not read as images" in capsys.readouterr().err


def test_masks_and_macos_folders_are_skipped_everywhere(tmp_path):
    data = write_covid_layout(tmp_path / "covid")
    (data / "COVID-19_Radiography_Dataset" / "Normal" / "__MACOSX").mkdir()
    Image.new("L", (8, 8)).save(data / "COVID-19_Radiography_Dataset" / "Normal" / "__MACOSX" / "x.png")
    for folder in ("segmentation", "Labels"):
        (data / "COVID-19_Radiography_Dataset" / "COVID" / folder).mkdir()
        Image.new("L", (8, 8)).save(data / "COVID-19_Radiography_Dataset" / "COVID" / folder / "y.png")
    source = sources.open_source(data)
    folders = {Path(i).relative_to(data).parts[-2] for split in source.splits.values() for i in split.ids}
    assert sum(len(split) for split in source.splits.values()) == 40 and folders == {"images"}
    predicted = sources.open_inputs([str(data / "COVID-19_Radiography_Dataset" / "COVID")])  # predict's reader too
    assert len(predicted) == 10


def test_predict_knows_the_class_of_a_covid_layout_image(tmp_path):
    from medclf.inference import labels_from_parent_folders

    data = write_covid_layout(tmp_path / "covid") / "COVID-19_Radiography_Dataset"
    paths = [str(p) for p in sources.open_inputs([str(data / "Lung_Opacity"), str(data / "COVID")]).paths]
    labels = labels_from_parent_folders(paths + ["elsewhere/x.png"], list(COVID_CLASSES))
    assert labels.tolist() == [1] * 10 + [0] * 10 + [-1]


def test_dataset_root_walks_wrappers_but_not_into_a_class(tmp_path):
    data = write_kermany_layout(tmp_path / "archive", train_patients=2)
    assert layouts.dataset_root(data) == data / "chest_xray"  # __MACOSX beside it is not a second folder
    single = tmp_path / "single" / "ONLY"
    single.mkdir(parents=True)
    Image.new("L", (8, 8)).save(single / "a.png")
    assert layouts.dataset_root(tmp_path / "single") == tmp_path / "single"
    with pytest.raises(MedclfError, match="one class only"):
        sources.open_source(tmp_path / "single")


def test_kermany_layout_resplits_tiny_val_grouped_by_patient(tmp_path, capsys):
    data = write_kermany_layout(tmp_path / "archive")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--size", "16", "--out", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "the given val has 2 images (< 50)" in err and "grouped by patient" in err
    rows = read_splits(run)
    assert not any("chest_xray/chest_xray" in r["id"] or "__MACOSX" in r["id"] for r in rows)
    assert sum(r["split"] == "test" for r in rows) == 12
    val = [r for r in rows if r["split"] == "val"]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) + len(val) == 4 * 20 + 2 and 6 <= len(val) <= 12  # the old val joined the pool; ~10% held out
    patients = {s: {g for g in sources.splits.patient_groups([r["id"] for r in part])}
                for s, part in (("train", train), ("val", val))}
    assert patients["val"] and not patients["train"] & patients["val"]
    assert {r["label"] for r in val} == {"NORMAL", "PNEUMONIA"}
    from medclf import inference, models

    ckpt = models.load_model(run / "model.pt")[1]
    again = inference.open_data(ckpt, str(data))  # what evaluate/report open: the same re-split val
    assert sorted(again.splits["val"].ids) == sorted(r["id"] for r in val)
    import yaml

    assert "grouped by patient" in yaml.safe_load((run / "plan.yaml").read_text())["splits"]["val"]
    assert "split val: the given val has 2 images" in out  # the printed plan says it too


def test_val_large_enough_or_without_gain_is_kept(split_folder):
    source = sources.open_source(split_folder)  # val 16 of 64: re-splitting would not give more
    before = list(source.splits["val"].ids)
    sources.ensure_val_split(source, 0.1, 0)
    assert source.splits["val"].ids == before and "val" not in source.generated_splits


def test_resplit_is_reproducible_and_stratified_without_patients(tmp_path):
    from conftest import write_class_folders

    write_class_folders(tmp_path / "d" / "train", {"a": 90, "b": 90})
    write_class_folders(tmp_path / "d" / "val", {"a": 2, "b": 2})
    first, second = (sources.open_source(tmp_path / "d") for _ in range(2))
    for source in (first, second):
        sources.ensure_val_split(source, 0.1, 3)
    assert first.splits["val"].ids == second.splits["val"].ids and len(first.splits["val"]) == 19
    assert "stratified (no patient ids known)" in first.generated_splits["val"]


# --------------------------------------------------------------------------- download

class FakeKaggle(http.server.BaseHTTPRequestHandler):
    """The two calls kagglehub makes for a dataset: GetDataset (current version), DownloadDataset (the archive)."""
    archive = b""
    status = 200
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        type(self).calls.append((self.path, body))
        if self.status != 200:
            self._send(self.status, json.dumps({"code": self.status, "message": "Unauthorized"}).encode(),
                       "application/json")
        elif self.path.endswith("/datasets.DatasetApiService/GetDataset"):
            self._send(200, json.dumps({"currentVersionNumber": 3}).encode(), "application/json")
        elif self.path.endswith("/datasets.DatasetApiService/DownloadDataset"):
            self._send(200, self.archive, "application/zip")
        else:
            self._send(404, b"{}", "application/json")

    def _send(self, status, payload, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return buffer.getvalue()


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch):
    """kagglehub pointed at a loopback server (its LOCALHOST environment, endpoint replaced), fake credentials."""
    from kagglesdk import kaggle_env

    handler = type("Handler", (FakeKaggle,), {"calls": [], "archive": zip_folder(write_covid_layout(tmp_path / "src"))})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL,
                        f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123")
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    yield handler
    server.shutdown()
    server.server_close()


def test_kaggle_download_extracts_into_the_cache_and_opens(fake_kaggle, tmp_path):
    source = sources.open_source("kaggle:tawsifurrahman/covid19-radiography-database")
    folder = tmp_path / "home" / "kaggle" / "tawsifurrahman" / "covid19-radiography-database"
    assert source.root == folder / "COVID-19_Radiography_Dataset" and source.classes == sorted(COVID_CLASSES)
    assert sum(len(s) for s in source.splits.values()) == 40
    (path, request), = [c for c in fake_kaggle.calls if c[0].endswith("DownloadDataset")]
    assert request["ownerSlug"] == "tawsifurrahman" and request["datasetSlug"] == "covid19-radiography-database"
    assert request["datasetVersionNumber"] == 3
    fake_kaggle.calls.clear()  # second use: the cache, no request
    assert sources.open_source("kaggle:tawsifurrahman/covid19-radiography-database").classes == source.classes
    assert fake_kaggle.calls == []


def test_kaggle_refused_download_is_one_line_naming_what_to_do(fake_kaggle, tmp_path, capsys):
    fake_kaggle.status = 401
    assert main(["train", "kaggle:someone/private-set", *FAST_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("medclf: error: cannot download kaggle:someone/private-set")
    assert "KAGGLE_USERNAME" in err and str(tmp_path / "home" / "kaggle" / "someone" / "private-set") in err
    assert not (tmp_path / "home" / "kaggle" / "someone").exists() or not any(
        (tmp_path / "home" / "kaggle" / "someone").iterdir())


def test_kaggle_offline_without_credentials(tmp_path, monkeypatch, capsys):
    from kagglesdk import kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL, "http://127.0.0.1:9")  # refused
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    assert main(["plan", "kaggle:paultimothymooney/chest-xray-pneumonia"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "~/.kaggle" in err and "place the extracted dataset folder at" in err


def test_kaggle_folder_placed_by_hand_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")  # any request would fail: nothing listens there
    write_kermany_layout(tmp_path / "home" / "kaggle" / "paultimothymooney" / "chest-xray-pneumonia", 2)
    source = sources.open_source("kaggle:paultimothymooney/chest-xray-pneumonia")
    assert source.classes == ["NORMAL", "PNEUMONIA"] and source.root.name == "chest_xray"


def test_mask_folder_beside_classes_is_not_a_class(tmp_path, capsys):
    from conftest import write_class_folders

    data = write_class_folders(tmp_path / "d", {"a": 10, "b": 10, "Masks": 10})
    assert sources.open_source(data).classes == ["a", "b"]
    assert "1 mask folder(s) not read as images (Masks)" in capsys.readouterr().err


def test_datasets_command_names_the_kaggle_form(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path))
    assert main(["datasets"]) == 0
    assert "kaggle:OWNER/SLUG      any Kaggle dataset" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["kaggle:", "kaggle:justone", "kaggle:a/b/c", "kaggle:a b/c"])
def test_bad_kaggle_name_is_one_line(name, capsys):
    assert main(["plan", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected kaggle:OWNER/SLUG" in err
