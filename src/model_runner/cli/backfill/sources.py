"""
The backfill's source files: finding them under files and folders, each once per key.

Every ``*.geojson``/``*.json`` FeatureCollection file and every ``*.ndjson``/``*.geojsonl`` file (one feature a
line, blank lines ignored) is a source; it becomes the object ``<prefix>/<file stem>.geojson`` (``.geojsonl`` for
a text sequence). Symbolic links are
followed, to files and to folders: a link is a source of its own when its name maps to another key than its target.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model_runner.sink.async_s3_sink import object_key
from model_runner.sink.encoding import OutputFormat

__all__ = [
    "COLLECTION_SUFFIXES",
    "LINE_SUFFIXES",
    "Outcome",
    "Source",
    "SourceError",
    "Status",
    "find_sources",
]

COLLECTION_SUFFIXES = frozenset({".geojson", ".json"})
LINE_SUFFIXES = frozenset({".ndjson", ".geojsonl"})
_SOURCE_SUFFIXES = COLLECTION_SUFFIXES | LINE_SUFFIXES

Status = Literal["written", "skipped", "failed", "planned"]


class SourceError(Exception):
    """A source file cannot be read or is not what its suffix says; the message is the reason."""


@dataclass(frozen=True)
class Source:
    """
    A file to write.

    :param path: The file, as found: through the symbolic links that led to it.
    :param size: Its size in bytes.
    """

    path: Path
    size: int

    @property
    def image_id(self) -> str:
        """
        The image id the file is written as.

        :return: The file's stem.
        """
        return self.path.stem


@dataclass(frozen=True)
class Outcome:
    """
    What became of a file.

    :param path: The file.
    :param status: ``written``, ``skipped`` (its object is up to date), ``failed``, or ``planned`` (a dry run
        would write it).
    :param key: The object key it maps to, when known.
    :param reason: Why it failed.
    :param bytes: Its size.
    """

    path: str
    status: Status
    key: str = ""
    reason: str = ""
    bytes: int = 0


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _unreadable_reason(path: Path) -> str:
    """
    Say why a path that is no regular file or folder cannot be a source.

    :param path: The path.
    :return: The reason, for its outcome.
    """
    try:
        os.stat(path)
    except OSError as error:
        if path.is_symlink():
            # "No such file or directory" for a dangling link, "Too many levels of symbolic links" for a loop.
            return f"broken symbolic link: {error.strerror or error}"
        return "no such file or directory"
    return "not a regular file"


def _kind(entry: os.DirEntry[str]) -> Literal["folder", "file", "other"]:
    # Through symbolic links; a loop of links raises, where a dangling link is only neither.
    try:
        return "folder" if entry.is_dir() else "file" if entry.is_file() else "other"
    except OSError:
        return "other"


def _folder_files(root: Path, failures: list[Outcome]) -> list[Path]:
    """
    Find the source files under a folder, following symbolic links to folders; each folder is read once.

    Reading each real folder once is what ends a cycle of links. Linked folders are read after the folders they
    sit in, so that a folder of the tree is found by its own path rather than through a link to it.

    :param root: The folder.
    :param failures: Where unreadable folders and broken links with a source's suffix are told.
    :return: The files, sorted by path.
    """
    found: list[Path] = []
    visited: set[Path] = set()
    folders: list[Path] = [root]
    linked: deque[Path] = deque()
    while folders or linked:
        folder = folders.pop() if folders else linked.popleft()
        real = folder.resolve()
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            failures.append(Outcome(str(folder), "failed", reason=f"cannot read folder: {error.strerror or error}"))
            continue
        subfolders: list[Path] = []
        for entry in entries:
            path, kind = Path(entry.path), _kind(entry)
            if kind == "folder":
                (linked if entry.is_symlink() else subfolders).append(path)
            elif _suffix(path) not in _SOURCE_SUFFIXES:
                continue
            elif kind == "file":
                found.append(path)
            else:
                failures.append(Outcome(str(path), "failed", reason=_unreadable_reason(path)))
        folders.extend(reversed(subfolders))
    return sorted(found)


def _source_files(paths: Sequence[str | Path], failures: list[Outcome]) -> Iterator[Path]:
    for given in map(Path, paths):
        if given.is_dir():
            yield from _folder_files(given, failures)
        elif not given.is_file():
            failures.append(Outcome(str(given), "failed", reason=_unreadable_reason(given)))
        elif _suffix(given) in _SOURCE_SUFFIXES:
            yield given
        else:
            failures.append(Outcome(str(given), "failed", reason="not a .geojson, .json, .ndjson or .geojsonl file"))


def find_sources(
    paths: Sequence[str | Path], prefix: str, output_format: OutputFormat = "geojson"
) -> tuple[list[Source], list[Outcome]]:
    """
    Find the files to write under files and folders (recursively, following symbolic links).

    A file is one source per key: reached twice under the same name (given twice, or through a link to it or to
    its folder) it is written once; a link with another name than its file is a source of its own, written to
    its own key. Different files whose names map to the same key are not written over each other: the first found
    is the source, the later ones fail. Broken links and unreadable folders fail too: nothing found is dropped
    uncounted.

    :param paths: Files and folders.
    :param prefix: The prefix of the keys.
    :param output_format: The format of the objects, which names their suffix.
    :return: The files to write, and the failures found on the way.
    """
    failures: list[Outcome] = []
    sources: list[Source] = []
    owners: dict[str, Path] = {}
    seen: set[tuple[Path, str]] = set()
    for path in _source_files(paths, failures):
        try:
            real = path.resolve()
            size = path.stat().st_size
            key = object_key(prefix, path.stem, output_format)
        except (OSError, RuntimeError, ValueError) as error:
            failures.append(Outcome(str(path), "failed", reason=str(error)))
            continue
        if (real, key) in seen:
            continue
        seen.add((real, key))
        owner = owners.setdefault(key, path)
        if owner is path:
            sources.append(Source(path, size))
        else:
            failures.append(Outcome(str(path), "failed", key, f"same object key as {owner}", size))
    return sources, failures
