"""Public datasets by name: every 2D MedMNIST set (metadata from the `medmnist` package) and MedNIST.

Files are downloaded on first use into $MEDCLF_DATA (default ~/.cache/medclf), checked against their MD5.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from ..errors import MedclfError

MEDNIST = {
    "url": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/MedNIST.tar.gz",
    "md5": "0bc7306e7427e00ad1c5526a6677552d",
    "filename": "MedNIST.tar.gz",
    "folder": "MedNIST",
}
MEDMNIST_SIZES = (28, 64, 128, 224)
# the offline demo: a PneumoniaMNIST sample shipped inside the package (medclf/demo/README.txt: licence, citations)
DEMO = {
    "name": "demo",
    "file": Path(__file__).resolve().parent.parent / "demo" / "pneumoniamnist_demo.npz",
    "classes": ["normal", "pneumonia"],
    "time_budget": 0.5,  # minutes: with setup and the final evaluation, `medclf train demo` ends in about a minute
}


def data_home() -> Path:
    return Path(os.environ.get("MEDCLF_DATA", Path.home() / ".cache" / "medclf")).expanduser()


def _medmnist_info() -> dict:
    from medmnist import INFO  # imported where used: only named MedMNIST data needs it

    return {k: v for k, v in INFO.items() if not k.endswith("3d")}


def parse_name(name: str) -> tuple[str, int]:
    base, _, size = name.lower().partition("@")
    try:
        return base, int(size) if size else 28
    except ValueError:
        raise MedclfError(f"bad dataset size in {name!r}: use NAME@SIZE with SIZE in {MEDMNIST_SIZES}") from None


def is_named(name: str) -> bool:
    base, _ = parse_name(name) if "/" not in name else ("", 0)
    # MedMNIST names end in "mnist": other missing paths are reported without importing medmnist
    return base in ("mednist", DEMO["name"]) or (base.endswith("mnist") and base in _medmnist_info())


def available() -> list[dict]:
    """Every named dataset with its cache state, for `medclf datasets`."""
    rows = [{"name": DEMO["name"], "classes": len(DEMO["classes"]), "file": str(DEMO["file"]),
             "cached": DEMO["file"].is_file(), "task": "binary-class (offline demo: 500 PneumoniaMNIST images, ships "
                                                        "with medclf)"}]
    rows += [{"name": "mednist", "classes": 6, "file": MEDNIST["filename"],
             "cached": (data_home() / MEDNIST["folder"]).is_dir(), "task": "multi-class"}]
    for base, info in _medmnist_info().items():
        for size in MEDMNIST_SIZES:
            name = base if size == 28 else f"{base}@{size}"
            file = _medmnist_file(base, size)
            rows.append({"name": name, "classes": len(info["label"]), "file": file,
                         "cached": (data_home() / file).is_file(), "task": info["task"]})
    return rows


def planned_budget(name: str) -> float | None:
    """Minutes the plan gives a named dataset when no budget is given: the demo's short one; None: the default."""
    return DEMO["time_budget"] if parse_name(name)[0] == DEMO["name"] else None


def _medmnist_file(base: str, size: int) -> str:
    return f"{base}.npz" if size == 28 else f"{base}_{size}.npz"


def fetch(name: str) -> tuple[Path, list[str] | None]:
    """Path of the dataset (downloaded if needed) and its class names."""
    base, size = parse_name(name)
    home = data_home()
    if base == DEMO["name"]:
        if size != 28:
            raise MedclfError(f"the demo sample comes at 28 px only, not {size}")
        return DEMO["file"], list(DEMO["classes"])
    if base == "mednist":
        folder = home / MEDNIST["folder"]
        if not folder.is_dir():
            archive = _download(MEDNIST["url"], home, MEDNIST["filename"], MEDNIST["md5"])
            with tarfile.open(archive) as tar:
                tar.extractall(home, filter="data")
        return folder, None
    info = _medmnist_info()[base]
    if size not in MEDMNIST_SIZES:
        raise MedclfError(f"{base} comes in sizes {', '.join(map(str, MEDMNIST_SIZES))}, not {size}")
    suffix = "" if size == 28 else f"_{size}"
    path = _download(info[f"url{suffix}"], home, _medmnist_file(base, size), info[f"MD5{suffix}"])
    labels = info["label"]
    return path, [labels[str(i)] for i in range(len(labels))]


def _download(url: str, home: Path, filename: str, md5: str) -> Path:
    from torchvision.datasets.utils import check_integrity, download_url

    path = home / filename
    if check_integrity(str(path), md5):
        return path
    home.mkdir(parents=True, exist_ok=True)
    try:
        download_url(url, str(home), filename)  # tqdm progress bar; MD5 checked below
    except Exception as exc:
        raise MedclfError(f"cannot download {filename} ({type(exc).__name__}); offline? "
                          f"place the file at {path} (from {url}, MD5 {md5})") from None
    if not check_integrity(str(path), md5):
        raise MedclfError(f"checksum mismatch for {path}; delete it and retry, or place a correct copy there")
    return path
