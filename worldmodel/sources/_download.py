"""Resumable HTTP(S)/file downloads with retries (standard library only).

A file is fetched into ``<dest>.part`` and renamed to ``dest`` only when complete, so an existing
``dest`` is always a finished download and is skipped. An interrupted ``.part`` is resumed with an
HTTP ``Range`` request when the server honours it (status 206), else restarted. Transient failures
(connection errors, timeouts, HTTP 5xx/429, a body shorter than its ``Content-Length``) are retried
with exponential backoff; permanent ones (HTTP 4xx, e.g. a dead TGIF link) are not.

Only ``http``/``https`` URLs are fetched (``file://`` only with ``allow_file=True``: a dataset list must
not make the downloader copy local files). A body is accepted only if its length is known and reached
(``Content-Length``) or its SHA-256 matches a pinned ``sha256``; a 206 resume must start at the offset
asked for (``Content-Range``), else the download restarts. :func:`extract_once` writes a completion
marker after an archive is fully unpacked, so an interrupted extraction is redone, never taken as done.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from worldmodel.atomic import atomic_replace

USER_AGENT = "videogpt-worldmodel-downloader/0.1"


class DownloadError(Exception):
    """A download failed. ``permanent`` is True when retrying cannot help (HTTP 4xx)."""

    def __init__(self, url: str, why: str, permanent: bool = False) -> None:
        super().__init__(f"{url}: {why}")
        self.url, self.why, self.permanent = url, why, permanent


def check_url(url: str, allow_file: bool = False) -> None:
    """``DownloadError`` (permanent) unless ``url`` is ``http(s)://`` (or ``file://`` with ``allow_file``)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    allowed = ("http", "https", "file") if allow_file else ("http", "https")
    if scheme not in allowed:
        raise DownloadError(
            url, f"scheme {scheme or '(none)'!r} refused; expected one of {list(allowed)}", permanent=True
        )


def _fetch_once(
    url: str, part: Path, timeout: float, chunk: int, bar: tqdm | None, need_length: bool
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s)/file URLs of public datasets
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # range not satisfiable: the .part already holds the whole file
            return
        raise DownloadError(
            url, f"HTTP {e.code} {e.reason}", permanent=400 <= e.code < 500 and e.code != 429
        ) from None
    with resp:
        status = resp.getcode() or 200  # file:// URLs have no status
        content_range = resp.headers.get("Content-Range") or ""
        if status == 206 and content_range.removeprefix("bytes ").split("-")[0].strip() == str(offset):
            mode = "ab"
        else:  # server ignored the Range header (or answered another range): start over
            mode, offset = "wb", 0
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        if expected is None and need_length:
            raise DownloadError(
                url,
                "the server sent no Content-Length, so a cut-off body cannot be told from a "
                "complete one; pass sha256= to verify the file instead",
                permanent=True,
            )
        if bar is not None and expected is not None:
            bar.reset(total=offset + expected)
            bar.update(offset)
        got = 0
        with open(part, mode) as f:
            while True:
                buf = resp.read(chunk)
                if not buf:
                    break
                f.write(buf)
                got += len(buf)
                if bar is not None:
                    bar.update(len(buf))
    if expected is not None and got < expected:
        raise DownloadError(url, f"connection closed after {got} of {expected} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    chunk: int = 1 << 20,
    progress: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    sha256: str | None = None,
    allow_file: bool = False,
) -> Path:
    """Fetch ``url`` to ``dest`` (skipped if ``dest`` exists), resuming a previous ``.part``.

    Args:
        url: ``http://`` or ``https://`` URL (``file://`` only with ``allow_file``).
        dest: final file path (parent directories are created).
        retries: extra attempts after a transient failure (total attempts ``retries + 1``).
        timeout: seconds of socket inactivity before an attempt fails.
        backoff: seconds before the first retry; doubled each further retry.
        chunk: bytes per read.
        progress: show a tqdm byte counter.
        sleep: the function used to wait between retries (tests pass a no-op).
        sha256: the file's published SHA-256 (hex): verified before ``dest`` is written (a mismatch deletes the
            download and raises); without it the response must carry a ``Content-Length``.
        allow_file: also accept ``file://`` URLs (local mirrors, tests).

    Returns:
        ``dest``.

    Raises:
        DownloadError: after the last failed attempt, or at once for a permanent (4xx) failure.
    """
    check_url(url, allow_file)
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    bar = tqdm(desc=dest.name, unit="B", unit_scale=True, leave=False) if progress else None
    try:
        for attempt in range(retries + 1):
            try:
                _fetch_once(url, part, timeout, chunk, bar, need_length=sha256 is None)
                if not part.exists():  # empty body
                    part.touch()
                if sha256 is not None:
                    h = hashlib.sha256()
                    with open(part, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
                    if h.hexdigest() != sha256.lower():
                        part.unlink()
                        raise DownloadError(
                            url,
                            f"SHA-256 {h.hexdigest()} does not match the pinned {sha256}; "
                            f"the download was deleted",
                            permanent=True,
                        )
                atomic_replace(part, dest)
                return dest
            except DownloadError as e:
                if e.permanent or attempt == retries:
                    raise
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                if attempt == retries:
                    raise DownloadError(url, f"failed after {retries + 1} attempts ({e})") from None
            sleep(backoff * 2**attempt)
    finally:
        if bar is not None:
            bar.close()
    raise AssertionError("unreachable")


@dataclass
class DownloadReport:
    """Outcome of :func:`download_many`: files fetched now, already present, and failures by URL."""

    downloaded: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"downloaded {len(self.downloaded)}, already present {len(self.present)}, "
            f"failed {len(self.failed)}"
        )


def download_many(
    items: Iterable[tuple[str, Path]],
    *,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadReport:
    """Download each ``(url, dest)``; a failure is recorded in the report and the rest go on."""
    items = list(items)
    report = DownloadReport()
    for url, dest in tqdm(items, desc="download", unit="file", disable=not progress):
        if Path(dest).exists():
            report.present.append(Path(dest))
            continue
        try:
            report.downloaded.append(
                download_file(url, dest, retries=retries, timeout=timeout, backoff=backoff, sleep=sleep)
            )
        except DownloadError as e:
            report.failed[url] = e.why
    return report


def extract(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Unpack a ``.tar``/``.tar.gz``/``.zip`` archive into ``into`` (refusing paths that escape it)."""
    archive, into = Path(archive), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not (into / name).resolve().is_relative_to(into.resolve()):
                    raise DownloadError(
                        str(archive), f"member {name!r} would be written outside {into}", True
                    )
            z.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
                try:
                    t.extractall(into, filter="data")
                except tarfile.FilterError as e:
                    raise DownloadError(str(archive), f"refused member: {e}", permanent=True) from None
            else:
                for m in t.getmembers():
                    if m.issym() or m.islnk() or not (into / m.name).resolve().is_relative_to(into.resolve()):
                        raise DownloadError(
                            str(archive), f"member {m.name!r} is a link or escapes {into}", True
                        )
                t.extractall(into)
    else:
        raise DownloadError(str(archive), "not a zip or tar archive; extract it by hand", permanent=True)
    return into


def extract_once(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """:func:`extract` unless a previous call completed it: a marker ``.<archive name>.extracted`` is written
    into ``into`` only after every member is unpacked, so a killed extraction is redone on the next call."""
    archive, into = Path(archive), Path(into)
    marker = into / f".{archive.name}.extracted"
    if marker.exists():
        return into
    extract(archive, into)
    marker.write_text(f"{archive.name}\n")
    return into


def which(tool: str) -> str | None:
    return shutil.which(tool)
