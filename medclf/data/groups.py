"""The group (patient or study) of each image, so that every split medclf makes keeps a group on one side.

Where groups come from, first that applies: a label file's group column (table.py); `--group-pattern REGEX`
on the file name (its first capture group, else the whole match); the DICOM tags PatientID, else
StudyInstanceUID, when every image is a DICOM naming one; Kermany-style chest X-ray file names
(`person123_bacteria_456.jpeg` → `person123`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import MedclfError
from . import dicom, splits


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise MedclfError(f"--group-pattern {pattern!r} is no regular expression: {exc}") from None


def pattern_groups(paths: Sequence[str], pattern: str) -> list[str]:
    """The part of every file name that --group-pattern finds (first capture group, else the whole match)."""
    regex = compile_pattern(pattern)
    groups = []
    for p in paths:
        match = regex.search(Path(p).name)
        if match is None or not (match.group(1) if regex.groups else match.group(0)):
            raise MedclfError(f"--group-pattern {pattern!r} finds no group in the file name {Path(p).name} ({p})")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return groups


def dicom_groups(paths: Sequence[str]) -> list[str] | None:
    """PatientID (else StudyInstanceUID) of every image when every image is a DICOM naming one; else None.
    A file whose header cannot be read is its own group: the store skips it (--skip-bad) or names it, and
    `medclf doctor` lists it as unreadable, instead of the grouping failing for the whole data set."""
    if not paths or not all(dicom.is_dicom(p) for p in paths):
        return None
    groups = [_group_or_path(p) for p in paths]
    return None if any(g is None for g in groups) else groups


def _group_or_path(path: str) -> str | None:
    try:
        return dicom.group_of(path)
    except MedclfError:
        return path


def find_groups(paths: Sequence[str], pattern: str | None = None) -> tuple[list[str] | None, str | None]:
    """(the group of every path, where they came from), or (None, None) when nothing names the groups."""
    if pattern:
        return pattern_groups(paths, pattern), f"--group-pattern {pattern}"
    found = dicom_groups(paths)
    if found is not None:
        return found, "DICOM PatientID/StudyInstanceUID"
    found = splits.patient_groups(paths)
    if found is not None:
        return found, "Kermany file names"
    return None, None
