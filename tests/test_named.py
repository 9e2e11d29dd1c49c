"""Named datasets: the real download path (torchvision's download_url, MD5 check) on files the test makes."""
import functools
import hashlib
import http.server
import tarfile
import threading

import numpy as np
import pytest

from medclf.cli import main
from medclf.data import named, sources
from medclf.errors import MedclfError

from conftest import write_class_folders


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def serve(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/src; yields the base URL."""
    (tmp_path / "src").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "src"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_medmnist(tmp_path, monkeypatch, serve):
    """A one-entry MedMNIST INFO whose URL points at a local npz served on loopback."""
    npz = tmp_path / "src" / "tinymnist.npz"
    np.savez(npz, train_images=np.zeros((6, 8, 8), np.uint8), train_labels=(np.arange(6) % 2).reshape(-1, 1),
             val_images=np.zeros((2, 8, 8), np.uint8), val_labels=np.array([[0], [1]]))
    url = f"{serve}/tinymnist.npz"
    info = {"tinymnist": {"url": url, "MD5": md5(npz), "url_64": url, "MD5_64": "0" * 32,
                          "task": "binary-class", "label": {"0": "normal", "1": "sick"}}}
    monkeypatch.setattr(named, "_medmnist_info", lambda: info)
    return npz


def test_download_checks_md5_and_caches(fake_medmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    source = sources.open_source("tinymnist")
    assert source.classes == ["normal", "sick"] and len(source.splits["train"]) == 6
    assert (tmp_path / "home" / "tinymnist.npz").is_file()
    fake_medmnist.unlink()  # second use: from the cache, no download
    assert sources.open_source("tinymnist").classes == ["normal", "sick"]


def test_checksum_mismatch_is_an_error(fake_medmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    with pytest.raises(MedclfError, match="checksum mismatch for .*tinymnist_64.npz"):
        sources.open_source("tinymnist@64")


def test_offline_error_names_the_file_to_place(fake_medmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    fake_medmnist.unlink()
    with pytest.raises(MedclfError, match=r"place the file at .*home/tinymnist.npz"):
        sources.open_source("tinymnist")


def test_mednist_archive_download_and_extract(tmp_path, monkeypatch, serve):
    src = write_class_folders(tmp_path / "build" / "MedNIST", {"Hand": 10, "HeadCT": 10}, size=8)
    archive = tmp_path / "src" / "MedNIST.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="MedNIST")
    monkeypatch.setattr(named, "MEDNIST", {**named.MEDNIST, "url": f"{serve}/MedNIST.tar.gz", "md5": md5(archive)})
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path / "home"))
    source = sources.open_source("mednist")
    assert source.classes == ["Hand", "HeadCT"] and sum(len(s) for s in source.splits.values()) == 20


def test_bad_size_and_unknown_name(capsys):
    with pytest.raises(MedclfError, match="comes in sizes"):
        named.fetch("pneumoniamnist@100")
    assert not named.is_named("no_such_folder")


def test_datasets_command_lists_medmnist_and_mednist(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "pneumoniamnist" in out and "bloodmnist@64" in out and "mednist" in out
