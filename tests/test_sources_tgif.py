"""TGIF gifs -> action-free store (exact palette frames, captions, splits) and the resumable downloader,
exercised against a local HTTP server on 127.0.0.1 and file:// URLs only."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_formats import TGIF_URLS, gif_frames, write_gif, write_tgif
from worldmodel.sources import tgif
from worldmodel.sources._common import SourceError
from worldmodel.sources._download import DownloadError, download_file
from worldmodel.sources._video import resize_center_crop
from worldmodel.store import EpisodeStore


def test_convert_exact_frames_captions_splits_and_missing_gifs(tmp_path):
    truth = write_tgif(tmp_path / "data", T=8, H=40, W=56, present=(0, 1, 2))
    r = tgif.convert(tmp_path / "data", tmp_path / "s", resolution=40, progress=False)
    assert r.converted == 3 and r.filtered == 1 and r.splits == {"train": 2, "val": 1, "test": 0}
    store = EpisodeStore(tmp_path / "s")
    assert store.meta.action_spec.kind == "none" and store.meta.fps == pytest.approx(10.0)
    for eid in store.episode_ids():
        ep = store.load(eid)
        frames, sentences, split = truth[ep.attrs["url"]]
        np.testing.assert_array_equal(ep.frames, frames[:, :, 8:48])  # 56x40 -> centre 40x40, exact palette
        assert json.loads(ep.attrs["captions"]) == sentences and ep.split == split
        assert ep.attrs["source_file"] == f"{eid}.gif"


def test_test_split_keeps_all_three_sentences_and_resize(tmp_path):
    truth = write_tgif(tmp_path / "data", T=6, present=(3,))
    tgif.convert(tmp_path / "data", tmp_path / "s", resolution=20, frame_skip=2, progress=False)
    store = EpisodeStore(tmp_path / "s")
    (eid,) = store.episode_ids("test")
    ep = store.load(eid)
    frames, sentences, _ = truth[TGIF_URLS[3]]
    assert json.loads(ep.attrs["captions"]) == sentences and len(sentences) == 3
    np.testing.assert_array_equal(ep.frames, np.stack([resize_center_crop(f, 20) for f in frames[::2]]))


def test_corrupt_gif_and_hash_split_without_split_files(tmp_path):
    write_tgif(tmp_path / "data", T=4, present=(0, 1))
    bad = tmp_path / "data" / "gifs" / TGIF_URLS[1].rsplit("/", 1)[1]
    bad.write_bytes(b"GIF89a" + b"\x00" * 20)
    with pytest.raises(SourceError, match=bad.name):
        tgif.convert(tmp_path / "data", tmp_path / "s", resolution=16, progress=False)
    for p in (tmp_path / "data" / "splits").iterdir():
        p.unlink()
    with pytest.warns(UserWarning, match=bad.name):
        r = tgif.convert(
            tmp_path / "data",
            tmp_path / "s2",
            resolution=16,
            skip_corrupt=True,
            progress=False,
            val_fraction=0.0,
            test_fraction=0.0,
        )
    assert r.converted == 1 and r.splits["train"] == 1 and len(r.skipped) == 1
    with pytest.raises(SourceError, match="tgif-v1.0.tsv"):
        tgif.convert(tmp_path / "nowhere", tmp_path / "s3", progress=False)


# ----------------------------------------------------------------------------------------------
# Downloader: a bounded local server on 127.0.0.1 that honours Range and can fail on purpose
# ----------------------------------------------------------------------------------------------


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.fail_next = files, [], {}
        self.no_length: set[str] = set()  # paths answered without Content-Length
        self.wrong_range: set[str] = set()  # paths whose 206 answers start at byte 0 whatever was asked
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server API
                owner.requests.append((self.path, self.headers.get("Range")))
                if owner.fail_next.get(self.path, 0) > 0:
                    owner.fail_next[self.path] -= 1
                    self.send_error(503, "try again")
                    return
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404, "gone")
                    return
                rng = self.headers.get("Range")
                if rng:
                    start = (
                        0 if self.path in owner.wrong_range else int(rng.removeprefix("bytes=").split("-")[0])
                    )
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                if self.path not in owner.no_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _gif_bytes(tmp_path: Path, seed: int) -> bytes:
    p = tmp_path / f"src{seed}.gif"
    write_gif(p, gif_frames(5, 24, 24, seed))
    return p.read_bytes()


def test_download_gifs_skips_present_resumes_partial_retries_and_reports_dead_links(tmp_path):
    a, b, c = (_gif_bytes(tmp_path, s) for s in range(3))
    files = {"/x/tumblr_a_500.gif": a, "/y/tumblr_b_400.gif": b, "/z/tumblr_c_250.gif": c}
    out = tmp_path / "gifs"
    out.mkdir()
    (out / "tumblr_a_500.gif").write_bytes(a)  # already complete
    (out / "tumblr_b_400.gif.part").write_bytes(b[:100])  # interrupted earlier
    with _Server(files) as srv:
        srv.fail_next["/z/tumblr_c_250.gif"] = 2  # two transient 503s, then success
        urls = [srv.url(p) for p in files] + [srv.url("/dead/tumblr_d_500.gif")]
        rep = tgif.download_gifs(urls, out, retries=3, backoff=0.0, progress=False, sleep=lambda s: None)
        assert [p.name for p in rep.present] == ["tumblr_a_500.gif"]
        assert sorted(p.name for p in rep.downloaded) == ["tumblr_b_400.gif", "tumblr_c_250.gif"]
        assert list(rep.failed) == [urls[3]] and "404" in rep.failed[urls[3]]
        assert (out / "tumblr_b_400.gif").read_bytes() == b and (out / "tumblr_c_250.gif").read_bytes() == c
        assert not list(out.glob("*.part"))
        paths = [p for p, _ in srv.requests]
        assert "/x/tumblr_a_500.gif" not in paths  # present: never requested
        assert ("/y/tumblr_b_400.gif", "bytes=100-") in srv.requests  # resumed, not restarted
        assert paths.count("/z/tumblr_c_250.gif") == 3 and paths.count("/dead/tumblr_d_500.gif") == 1
        # a second run fetches nothing
        n = len(srv.requests)
        rep2 = tgif.download_gifs(urls[:3], out, backoff=0.0, progress=False)
        assert len(rep2.present) == 3 and len(srv.requests) == n
        # retries exhausted -> DownloadError, and no half file left under the final name
        srv.fail_next["/z/tumblr_c_250.gif"] = 5
        with pytest.raises(DownloadError, match="503"):
            download_file(urls[2], tmp_path / "other" / "c.gif", retries=1, backoff=0.0, sleep=lambda s: None)
        assert not (tmp_path / "other" / "c.gif").exists()


def test_file_url_download_and_server_ignoring_range_restarts(tmp_path):
    data = _gif_bytes(tmp_path, 7)
    src = tmp_path / "remote.gif"
    src.write_bytes(data)
    dest = tmp_path / "local" / "remote.gif"
    dest.parent.mkdir()
    dest.with_name("remote.gif.part").write_bytes(b"stale bytes")  # file:// ignores Range: must start over
    with pytest.raises(DownloadError, match="scheme 'file' refused"):  # a URL list must not copy local files
        download_file(src.as_uri(), dest)
    assert download_file(src.as_uri(), dest, allow_file=True).read_bytes() == data
    # TGIF URLs come from a downloaded list: file:// ones are reported, never fetched
    rep = tgif.download_gifs([src.as_uri()], tmp_path / "gifs", progress=False, sleep=lambda s: None)
    assert list(rep.failed) == [src.as_uri()] and "refused" in rep.failed[src.as_uri()]
    assert not (tmp_path / "gifs" / "remote.gif").exists()


def test_length_checksum_and_resume_offset_are_verified(tmp_path):
    import hashlib

    body = bytes(range(256)) * 40
    with _Server({"/a.bin": body, "/b.bin": body}) as srv:
        srv.no_length.add("/a.bin")
        with pytest.raises(DownloadError, match="no Content-Length"):
            download_file(srv.url("/a.bin"), tmp_path / "a.bin", retries=0)
        assert not (tmp_path / "a.bin").exists()
        good = hashlib.sha256(body).hexdigest()
        assert download_file(srv.url("/a.bin"), tmp_path / "a.bin", sha256=good).read_bytes() == body
        with pytest.raises(DownloadError, match="does not match the pinned"):
            download_file(srv.url("/b.bin"), tmp_path / "b.bin", sha256="0" * 64, retries=0)
        assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()
        # a 206 for another range than asked: the download restarts instead of appending the wrong bytes
        srv.wrong_range.add("/b.bin")
        (tmp_path / "b.bin.part").write_bytes(body[:100])
        assert download_file(srv.url("/b.bin"), tmp_path / "b.bin").read_bytes() == body


def test_download_dry_run_lists_metadata_files(tmp_path):
    plan = tgif.download(tmp_path, dry_run=True)
    assert plan[0] == (tgif.TSV_URL, tmp_path / "tgif-v1.0.tsv")
    assert [p.name for _, p in plan[1:]] == ["train.txt", "val.txt", "test.txt"] and not any(
        tmp_path.iterdir()
    )


def test_extract_once_redoes_a_partial_extraction_and_refuses_bad_members(tmp_path):
    import io
    import tarfile

    from worldmodel.sources._download import extract_once

    tar = tmp_path / "data.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in (("top/a.txt", b"a" * 100), ("top/b.txt", b"b" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    into = tmp_path / "out"
    (into / "top").mkdir(parents=True)
    (into / "top" / "a.txt").write_bytes(
        b"a" * 10
    )  # a killed extraction: the top folder exists, files are partial
    extract_once(tar, into)
    assert (into / "top" / "a.txt").read_bytes() == b"a" * 100 and (into / "top" / "b.txt").exists()
    assert (into / ".data.tar.extracted").exists()
    (into / "top" / "b.txt").unlink()
    extract_once(tar, into)  # completed before: not redone
    assert not (into / "top" / "b.txt").exists()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(DownloadError, match="evil.tar"):
        extract_once(evil, tmp_path / "evil")
    assert not (tmp_path / "evil" / ".evil.tar.extracted").exists()
