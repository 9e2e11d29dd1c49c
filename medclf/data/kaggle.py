"""Kaggle datasets by name: `kaggle:OWNER/SLUG` (or `kaggle:OWNER/SLUG/versions/N`).

Downloaded once with Kaggle's official client (`kagglehub`, the user's own credentials) and extracted into
$MEDCLF_DATA/kaggle/OWNER/SLUG; a folder already there (a download, or one the user extracted by hand) is used as is,
with no network. `layouts.py` then reads its folders as they come.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import MedclfError
from .named import data_home
from .sources import KAGGLE_PREFIX

_HANDLE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/versions/\d+)?$")
CREDENTIALS_HINT = "set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle (kaggle.com → Settings → API)"


def parse_handle(name: str) -> str:
    """OWNER/SLUG[/versions/N] from `kaggle:OWNER/SLUG[/versions/N]`."""
    handle = name[len(KAGGLE_PREFIX):] if name.startswith(KAGGLE_PREFIX) else name
    if not _HANDLE.match(handle):
        raise MedclfError(f"bad Kaggle dataset {name!r}: expected kaggle:OWNER/SLUG "
                          "(e.g. kaggle:paultimothymooney/chest-xray-pneumonia)")
    return handle


def folder_for(handle: str) -> Path:
    """Where the extracted dataset lives in medclf's data cache."""
    return data_home() / "kaggle" / handle


def fetch(name: str) -> Path:
    """The extracted dataset folder, downloaded with kagglehub unless it is already in the cache."""
    handle = parse_handle(name)
    folder = folder_for(handle)
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    partial = folder.with_name(folder.name + ".partial")  # a broken download never looks like a dataset
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _download(handle, partial, name, folder)
    if folder.is_dir():  # an empty folder left in the way
        folder.rmdir()
    partial.rename(folder)
    return folder


def _download(handle: str, into: Path, name: str, folder: Path) -> None:
    import kagglehub  # imported where used: only Kaggle data needs it
    import requests
    from kagglehub import exceptions as hub

    failures = (requests.RequestException, hub.CredentialError, hub.UnauthenticatedError, hub.NotFoundError,
                hub.DataCorruptionError, hub.BackendError)
    try:
        kagglehub.dataset_download(handle, output_dir=str(into))
    except failures as exc:
        shutil.rmtree(into, ignore_errors=True)
        raise MedclfError(f"cannot download {name} ({_reason(exc)}); offline or no Kaggle credentials? "
                          f"{CREDENTIALS_HINT}; or place the extracted dataset folder at {folder}") from None


def _reason(exc: Exception) -> str:
    """A short cause: the HTTP status, the kind of network failure, or kagglehub's first line."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code}"
    if isinstance(exc, requests.RequestException):
        return type(exc).__name__
    lines = str(exc).strip().splitlines()
    return lines[0][:120] if lines else type(exc).__name__
