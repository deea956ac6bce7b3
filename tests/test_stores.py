"""The byte layer under `prepare --archives`: local folders, http(s) URLs and Hugging Face datasets, read once with
resumes over cut connections, against the loopback server in tests/httpserver.py."""

import hashlib
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from warmstart.errors import UserError
from warmstart.prepare import facts, stores
from warmstart.prepare.stores import Entry, HfStore, HttpStore, LocalStore, Restart, open_store

sys.path.insert(0, str(Path(__file__).parent))
from httpserver import serve  # noqa: E402

REPO = "ILSVRC/imagenet-1k"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(stores, "BACKOFF", (0.001, 0.01))


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


def write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_all(stream, n: int = 100_000) -> bytes:
    out = bytearray()
    while chunk := stream.read(n):
        out += chunk
        assert len(out) <= 10 << 20, "more bytes than any test file: a stream that never ends"
    return bytes(out)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# --- local ---

def test_local_folder_entries_open_offset_and_path(tmp_path):
    a, b = blob(5000, 1), blob(300, 2)
    write(tmp_path, {"a.tar": a, "data/val_images.tar.gz": b, ".hidden": b"x",
                     ".cache/huggingface/download/a.tar.metadata": b"x"})
    (tmp_path / ".cache/huggingface/link").symlink_to(tmp_path / "a.tar")  # hidden: skipped, not refused
    store = open_store(str(tmp_path))
    assert isinstance(store, LocalStore) and not store.remote and store.where == str(tmp_path.resolve())
    assert store.entries() == {"a.tar": Entry("a.tar", 5000, None),
                               "data/val_images.tar.gz": Entry("data/val_images.tar.gz", 300, None)}
    assert store.path("data/val_images.tar.gz") == tmp_path / "data/val_images.tar.gz"
    with store.open("a.tar", 1234) as f:
        assert f.position == 1234 and read_all(f, 1000) == a[1234:]
        assert f.position == 5000 and f.network_seconds == 0 and f.resumes == []
    single = open_store(str(tmp_path / "a.tar"))  # one file: named by its basename
    assert single.entries() == {"a.tar": Entry("a.tar", 5000, None)}
    assert read_all(single.open("a.tar")) == a


def test_local_follows_links_to_files_not_to_folders_and_refuses_missing_paths(tmp_path, monkeypatch):
    """huggingface-cli's cache links a snapshot's files to blobs: read through. A linked folder is not walked (no
    loops), a dangling link is skipped."""
    write(tmp_path, {"blobs/1234": b"abc", "elsewhere/x.tar": b"x"})
    (tmp_path / "snap/data").mkdir(parents=True)
    (tmp_path / "snap/data/val_images.tar.gz").symlink_to(tmp_path / "blobs/1234")
    (tmp_path / "snap/loop").symlink_to(tmp_path / "snap")
    (tmp_path / "snap/other").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "snap/dangling.tar").symlink_to(tmp_path / "nothing")
    store = open_store(str(tmp_path / "snap"))
    assert list(store.entries()) == ["data/val_images.tar.gz"] and store.entries()["data/val_images.tar.gz"].size == 3
    assert store.open("data/val_images.tar.gz").read(10) == b"abc"
    with pytest.raises(UserError, match="does not exist") as e:
        open_store(str(tmp_path / "nope"))
    one_line(e)
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, {"real/a.tar": b"abc"})
    assert open_store("~/real/a.tar").where == str(tmp_path / "real/a.tar")


# --- dispatch ---

def test_open_store_dispatches_on_the_scheme(tmp_path):
    assert isinstance(open_store("http://127.0.0.1:9/dir/"), HttpStore)
    assert open_store("HTTP://127.0.0.1:9").url == "HTTP://127.0.0.1:9/"  # a bare host is a folder
    file = open_store("https://example.org/x/ILSVRC2012_img_val.tar")
    assert type(file) is HttpStore and file.remote and file.where == "https://example.org/x/ILSVRC2012_img_val.tar"
    hf = open_store("hf://datasets/ILSVRC/imagenet-1k")
    assert isinstance(hf, HfStore) and hf.where == "hf://datasets/ILSVRC/imagenet-1k@main" and hf.repo == REPO
    hf = open_store("hf://datasets/timm/imagenet-1k-wds@refs/convert/parquet")
    assert (hf.repo, hf.rev) == ("timm/imagenet-1k-wds", "refs/convert/parquet")
    assert hf.file_url("data/x.tar").endswith("/datasets/timm/imagenet-1k-wds/resolve/refs%2Fconvert%2Fparquet/"
                                              "data/x.tar")
    for spec in ("ftp://host/x", "s3://bucket/x", "gs://bucket/x"):
        with pytest.raises(UserError, match=r"cannot read (ftp|s3|gs):// URLs.*http\(s\)://.*hf://datasets") as e:
            open_store(spec)
        one_line(e)
    for spec in ("hf://models/org/name", "hf://datasets/only-owner", "hf://datasets/a/b@", "hf://datasets/a/b/c"):
        with pytest.raises(UserError, match="expected hf://datasets/OWNER/NAME") as e:
            open_store(spec)
        one_line(e)


# --- plain http ---

def test_folder_url_probes_the_official_and_hub_names(tmp_path):
    official = write(tmp_path / "official", {facts.TRAIN_TAR: blob(700), facts.VAL_TAR: blob(500),
                                             facts.DEVKIT: blob(9), "MD5SUMS": b"x", "unrelated.tar": b"y"})
    # a bucket that forbids listing answers 403 for a missing name: absent, once other names were found
    with serve(official, status_for={"/" + facts.TEST_TARS[0]: 403}) as server:
        store = open_store(server.url)
        assert {n: e.size for n, e in store.entries().items()} == {
            facts.TRAIN_TAR: 700, facts.VAL_TAR: 500, facts.DEVKIT: 9, "MD5SUMS": 1}
        assert {p for m, p, _, _ in server.requests} == {"/" + n for n in stores.KNOWN}
    hub = write(tmp_path / "hub", {"data/val_images.tar.gz": blob(400), "data/train_images_3.tar.gz": blob(300)})
    with serve(hub, head=False) as server:  # HEAD refused (405): a one-byte GET instead
        store = open_store(server.url)
        assert {n: e.size for n, e in store.entries().items()} == {
            "data/val_images.tar.gz": 400, "data/train_images_3.tar.gz": 300}
        assert ("GET", "/data/val_images.tar.gz", "bytes=0-0", 206) in server.requests
    write(tmp_path / "empty", {"other.tar": b"z"})
    with serve(tmp_path / "empty") as server, pytest.raises(UserError, match=f"holds none of {facts.TRAIN_TAR}") as e:
        open_store(server.url).entries()
    assert "data/val_images.tar.gz" in one_line(e)


def test_file_url_is_one_entry_named_by_its_last_segment(tmp_path):
    data = blob(2000, 3)
    write(tmp_path, {"sub/my val.tar": data})
    with serve(tmp_path) as server:
        store = open_store(server.url + "sub/my%20val.tar")
        assert store.entries() == {"my val.tar": Entry("my val.tar", 2000, None)}
        assert read_all(store.open("my val.tar")) == data
        assert store.path("my val.tar") is None


def test_cut_connections_resume_with_range_byte_exactly(tmp_path):
    files = {facts.VAL_TAR: blob(2_000_000, 4), facts.TRAIN_TAR: blob(1_634_567, 5)}
    write(tmp_path, files)
    with serve(tmp_path, cut_after=300_000, cuts_per_file=5) as server:
        store = open_store(server.url)
        for name, data in files.items():
            heard = []
            f = store.open(name, on_resume=heard.append)
            assert read_all(f, 1 << 20) == data and f.position == len(data)
            assert len(f.resumes) == 5 and heard == f.resumes and f.network_seconds > 0
            assert f.resumes[0] == f"{name}: connection dropped at byte 300,000 (IncompleteRead); resumed with Range"
            ranges = [r for m, p, r, _ in server.requests if m == "GET" and p == "/" + name]
            assert ranges == [None] + [f"bytes={300_000 * i}-" for i in range(1, 6)]


def test_every_response_cut_still_finishes_while_bytes_arrive(tmp_path):
    data = blob(50_000, 6)
    write(tmp_path, {facts.VAL_TAR: data})
    with serve(tmp_path, cut_after=4000) as server:  # 11 cuts, more than the 8 tries: each one brought new bytes
        f = open_store(server.url).open(facts.VAL_TAR, offset=2000)
        assert read_all(f) == data[2000:] and len(f.resumes) == 11


def test_gives_up_after_consecutive_failures_with_no_new_byte(tmp_path):
    write(tmp_path, {facts.VAL_TAR: blob(10_000)})
    with serve(tmp_path, cut_after=0) as server:
        store = open_store(server.url)
        gave_up = r"gave up at byte 0 after 8 failed tries \(IncompleteRead: .*\); rerunning the command resumes"
        with pytest.raises(UserError, match=gave_up) as e:
            read_all(store.open(facts.VAL_TAR))
        assert server.url + facts.VAL_TAR in one_line(e)


def test_a_silent_server_times_out_and_is_retried(tmp_path, monkeypatch):
    write(tmp_path, {facts.VAL_TAR: blob(1000)})
    monkeypatch.setattr(stores, "TIMEOUT", (5, 0.05))
    with serve(tmp_path, latency=0.2) as server:
        store = HttpStore(server.url)
        store._entries = {}
        with pytest.raises(UserError, match=r"gave up at byte 0 after 8 failed tries \(ReadTimeoutError: "):
            store.open(facts.VAL_TAR)
        assert len(server.auth) == 8  # each try reached the server


def test_offsets_and_the_end_of_the_file(tmp_path):
    data = blob(10_000, 7)
    write(tmp_path, {facts.VAL_TAR: data})
    with serve(tmp_path) as server:
        store = open_store(server.url + facts.VAL_TAR)
        assert read_all(store.open(facts.VAL_TAR, 9_999)) == data[-1:]
        f = store.open(facts.VAL_TAR, 10_000)  # at the end: 416, an empty stream
        assert f.read(10) == b"" and f.position == 10_000


def test_a_server_that_ignores_range_means_restart(tmp_path):
    write(tmp_path, {facts.VAL_TAR: blob(100_000)})
    with serve(tmp_path, cut_after=30_000, ignore_range=True) as server:
        f = open_store(server.url).open(facts.VAL_TAR)
        with pytest.raises(Restart, match=r"ignores Range requests \(answered 200\); restarting the file"):
            read_all(f)
        with pytest.raises(Restart, match="ignores Range"):  # a first request from an offset, too
            open_store(server.url).open(facts.VAL_TAR, 5)


def test_an_answer_from_another_byte_means_restart(tmp_path):
    write(tmp_path, {facts.VAL_TAR: blob(100_000)})
    with serve(tmp_path, cut_after=30_000, range_shift=1) as server:
        f = open_store(server.url).open(facts.VAL_TAR)
        with pytest.raises(Restart, match=r"answered Content-Range 'bytes 30001-99999/100000' to a request from "
                                          r"byte 30,000; restarting the file"):
            read_all(f)


def test_a_file_that_changes_under_a_resume_means_restart(tmp_path):
    path = write(tmp_path, {facts.VAL_TAR: blob(100_000)}) / facts.VAL_TAR
    with serve(tmp_path, cut_after=30_000) as server:
        f = open_store(server.url).open(facts.VAL_TAR)
        assert len(f.read(30_000)) == 30_000
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version: another ETag
        with pytest.raises(Restart, match=r"changed since the read began \(ETag .* became .*\); restarting the file"):
            read_all(f)


def test_status_errors_are_one_line(tmp_path):
    write(tmp_path, {facts.VAL_TAR: blob(1000), facts.TRAIN_TAR: blob(1000)})
    with serve(tmp_path, status_for={"/" + facts.TRAIN_TAR: 403}) as server:
        with pytest.raises(UserError, match=r"not found \(HTTP 404\): .*/missing.tar") as e:
            open_store(server.url + "missing.tar").entries()
        one_line(e)
        with pytest.raises(UserError, match=r"access denied \(HTTP 403\): the server refused access") as e:
            open_store(server.url + facts.TRAIN_TAR).entries()
        one_line(e)
        with pytest.raises(UserError, match=r"not found \(HTTP 404\)"):
            open_store(server.url).open("data/val_images.tar.gz")
    with serve(tmp_path, status_for={"/" + facts.VAL_TAR: 503}) as server:
        with pytest.raises(UserError, match=r"answered HTTP 503; check the URL, or try again later") as e:
            HttpStore(server.url).entries()
        one_line(e)
        store = HttpStore(server.url)
        store._entries = {}  # past the probe: the stream retries a busy server, then gives up
        with pytest.raises(UserError, match=r"gave up at byte 0 after 8 failed tries \(HTTP 503\)") as e:
            store.open(facts.VAL_TAR)
        one_line(e)


def test_a_bearer_token_reaches_the_server(tmp_path):
    data = blob(1000)
    write(tmp_path, {facts.VAL_TAR: data})
    with serve(tmp_path, token="s3cret") as server:
        with pytest.raises(UserError, match=r"access denied \(HTTP 401\)") as e:
            open_store(server.url).entries()
        assert "s3cret" not in one_line(e)
        store = HttpStore(server.url, headers={"Authorization": "Bearer s3cret"})
        assert read_all(store.open(facts.VAL_TAR)) == data
        assert server.auth[-1] == ("/" + facts.VAL_TAR, "Bearer s3cret")


# --- Hugging Face ---

@pytest.fixture
def hub(tmp_path):
    """A repo with a main branch (66 files: two pages of the tree) and a refs/convert/parquet revision."""
    files = {"data/val_images.tar.gz": blob(1_500_000, 8), "data/train_images_0.tar.gz": blob(70_000, 9),
             "README.md": b"# ImageNet\n", **{f"extra/f{i:02d}.txt": b"%d" % i for i in range(60)}}
    write(tmp_path / "main", files)
    write(tmp_path / "parquet", {"default/val/0000.parquet": blob(5000, 10)})
    return tmp_path, files, {REPO: {"main": "main", "refs/convert/parquet": "parquet"}}


def test_hf_lists_with_pagination_and_publishes_lfs_sha256(hub):
    root, files, hf = hub
    with serve(root, hf=hf) as server:
        store = HfStore(f"hf://datasets/{REPO}", endpoint=server.url, token="")
        entries = store.entries()
        assert set(entries) == set(files) and store.remote
        for name, data in files.items():
            lfs = name.endswith(".tar.gz")
            assert entries[name] == Entry(name, len(data), hashlib.sha256(data).hexdigest() if lfs else None)
        assert sum("/tree/" in p for _, p, _, _ in server.requests) == 2  # 66 files and 2 folders: two pages
        parquet = HfStore(f"hf://datasets/{REPO}@refs/convert/parquet", endpoint=server.url, token="")
        assert parquet.where == f"hf://datasets/{REPO}@refs/convert/parquet"
        assert list(parquet.entries()) == ["default/val/0000.parquet"]
        name = "default/val/0000.parquet"
        assert read_all(parquet.open(name)) == (root / "parquet" / name).read_bytes()


def test_hf_reads_through_the_redirect_without_sending_the_token_to_the_cdn(hub, monkeypatch):
    root, files, hf = hub
    # the CDN on another host name ("localhost" is not "127.0.0.1" to requests), cutting each file 3 times
    with serve(root, cut_after=400_000, cuts_per_file=3) as cdn:
        with serve(root, hf=hf, token="s3cret", redirect=cdn.url.replace("127.0.0.1", "localhost")) as server:
            monkeypatch.setenv("HF_TOKEN", "s3cret")  # found by huggingface_hub.get_token()
            store = HfStore(f"hf://datasets/{REPO}", endpoint=server.url)
            name = "data/val_images.tar.gz"
            f = store.open(name)
            assert read_all(f, 1 << 20) == files[name] and len(f.resumes) == 3
            assert all(auth == "Bearer s3cret" for _, auth in server.auth)
            assert ("GET", f"/datasets/{REPO}/resolve/main/{name}", "bytes=400000-", 302) in server.requests
    assert [(p, r) for _, p, r, _ in cdn.requests] == [(f"/cdn/main/{name}", None)] + [
        (f"/cdn/main/{name}", f"bytes={400_000 * i}-") for i in (1, 2, 3)]
    assert all(auth is None for _, auth in cdn.auth)


def test_hf_errors_are_one_line(hub, monkeypatch):
    root, files, hf = hub
    with serve(root, hf=hf, token="s3cret") as server:
        for token in ("wrong", ""):  # a wrong token; none at all (the Hub says: gated)
            with pytest.raises(UserError, match=r"access denied \(HTTP 401\): set HF_TOKEN .*accept the dataset's "
                                                 rf"terms on {server.url}datasets/{REPO}") as e:
                HfStore(f"hf://datasets/{REPO}", endpoint=server.url, token=token).entries()
            assert "wrong" not in one_line(e)
        store = HfStore(f"hf://datasets/{REPO}", endpoint=server.url, token="s3cret")
        store._entries = {}  # listing allowed, the file refused: the same hint from the stream's first request
        server.status_for[f"/datasets/{REPO}/resolve/main/README.md"] = 403
        with pytest.raises(UserError, match=r"access denied \(HTTP 403\): set HF_TOKEN") as e:
            store.open("README.md")
        one_line(e)
        with pytest.raises(UserError, match=r"dataset nobody/nothing not found \(HTTP 404\)") as e:
            HfStore("hf://datasets/nobody/nothing", endpoint=server.url, token="s3cret").entries()
        one_line(e)
        with pytest.raises(UserError, match=r"revision 'v9' not found in dataset") as e:
            HfStore(f"hf://datasets/{REPO}@v9", endpoint=server.url, token="s3cret").entries()
        one_line(e)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(time, "sleep", lambda s: None)  # huggingface_hub's own back-off
    with pytest.raises(UserError, match=rf"cannot reach the Hub at {endpoint} .*HF_ENDPOINT is honoured") as e:
        HfStore(f"hf://datasets/{REPO}", endpoint=endpoint, token="").entries()
    one_line(e)


def test_no_file_is_read_past_the_size_its_listing_gave(tmp_path):
    """A server that sends more than the listing said (an endless body for a 'small' file) is refused, not buffered."""
    write(tmp_path, {"ILSVRC2012_img_val.tar": b"x" * 1000})
    with serve(tmp_path) as server:
        store = HttpStore(server.url + "ILSVRC2012_img_val.tar")
        assert store.entries()["ILSVRC2012_img_val.tar"].size == 1000
        (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"y" * 5000)  # the server now sends 5x the listed size
        with pytest.raises(UserError, match="the file list says 1,000 bytes but the server sends 5,000") as e:
            store.open("ILSVRC2012_img_val.tar")
        one_line(e)
