"""`prepare --archives URL`: the layouts streamed from a loopback HTTP server (Range, a bearer token, responses cut
short, a server that ignores Range) and from hf:// through HF_ENDPOINT: the same tree as from local files, the
resumes in the log, a SIGKILL half-way resumed without fetching finished files again, and one line per bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from httpserver import serve
from warmstart.cli import main
from warmstart.prepare import facts, fixtures

CLASSES = fixtures.pick_classes(10, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
SIZES = dict(per_class=3, val=20, test=4)
TOKEN = "hf_loopback_token"


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "prepared.json"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """The official, hf-tars and wds fixtures side by side (the Hub emulation serves each as a repo), and the
    official tree prepared from local files: the reference every streamed prepare must equal."""
    root = tmp_path_factory.mktemp("remote")
    for layout in ("official", "hf-tars", "hf-parquet", "wds"):
        fixtures.LAYOUTS[layout](root / layout, CLASSES, **SIZES)
    assert main(["prepare", "--archives", str(root / "official"), "--out", str(root / "reference"), "--partial"]) == 0
    return root


def reference(sources: Path, test: bool = True) -> dict[str, str]:
    return {k: v for k, v in tree(sources / "reference").items() if test or not k.startswith("test/")}


HUB = {"ILSVRC/imagenet-1k": {"main": "hf-tars", "refs/convert/parquet": "hf-parquet"},
       "timm/imagenet-1k-wds": {"main": "wds"}}


def run(args: list[str], tmp_path: Path, endpoint: str | None = None, token: str | None = TOKEN,
        script: str | None = None) -> subprocess.CompletedProcess:
    """warmstart in a child process: huggingface_hub reads HF_ENDPOINT when it is imported, as it does for users."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}  # no token file of the machine's
    if endpoint:
        env["HF_ENDPOINT"] = endpoint.rstrip("/")
    if token:
        env["HF_TOKEN"] = token
    code = script or "import sys; from warmstart.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def gets(server, name: str) -> list:
    return [r for r in server.requests if r[0] == "GET" and r[1].endswith(name)]


def test_official_folder_url_cut_five_times_per_file_gives_the_same_tree(sources, tmp_path):
    cut = min((sources / "official" / n).stat().st_size for n in (facts.TRAIN_TAR, facts.VAL_TAR)) // 6
    with serve(sources / "official", cut_after=cut, cuts_per_file=5) as server:
        out = tmp_path / "out"
        r = run(["prepare", "--archives", server.url, "--out", str(out), "--partial"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree(out) == reference(sources)
    for name in (facts.TRAIN_TAR, facts.VAL_TAR):  # the log lists each resume, and each was a Range request
        assert r.stdout.count(f"{name}: connection dropped") == 5, r.stdout
        assert sum(1 for g in gets(server, name) if g[2]) == 5
    doc = json.loads((out / "prepared.json").read_text())
    assert {c["file"]: c["md5"] for c in doc["checksums"]}[facts.VAL_TAR] == fixtures.md5sum(sources / "official" / facts.VAL_TAR)


@pytest.mark.parametrize("repo,layout", [("ILSVRC/imagenet-1k", "hf-tars"), ("timm/imagenet-1k-wds", "wds"),
                                         ("ILSVRC/imagenet-1k@refs/convert/parquet", "hf-parquet")])
def test_hf_dataset_through_hf_endpoint_with_cuts_gives_the_same_tree(sources, tmp_path, repo, layout):
    with serve(sources, hf=HUB, token=TOKEN, redirect=True, cut_after=48 << 10, cuts_per_file=5) as server:
        out = tmp_path / "out"
        r = run(["prepare", "--archives", f"hf://datasets/{repo}", "--out", str(out), "--partial"], tmp_path,
                endpoint=server.url)
    assert r.returncode == 0, r.stderr
    assert tree(out) == reference(sources, test=layout != "wds")
    assert r.stdout.count("connection dropped") >= 5
    doc = json.loads((out / "prepared.json").read_text())
    assert doc["verified"] and all(c["match"] is True and c["published_by"] == "the hub's file list"
                                   for c in doc["checksums"])


KILL_AFTER_COMMITS = """
import os, signal, sys
from warmstart.prepare import extract
real, seen = extract.Output._commit_first, []
def killed(self):
    key = self.pending[0][0]
    real(self)
    seen.append(key)
    if sum(k.startswith(PREFIX) for k in seen) == 3:  # a real SIGKILL: no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
extract.Output._commit_first = killed
from warmstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


def killer(prefix: str) -> str:
    """A child that SIGKILLs itself once three units whose journal key starts with `prefix` are whole."""
    return f"PREFIX = {prefix!r}\n" + KILL_AFTER_COMMITS


def test_sigkill_half_way_through_a_streamed_prepare_then_rerun_fetches_only_what_was_left(sources, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "--archives", "hf://datasets/ILSVRC/imagenet-1k", "--out", str(out), "--partial"]
    with serve(sources, hf=HUB, token=TOKEN) as server:
        killed = run(args, tmp_path, endpoint=server.url, script=killer(""))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        finished = [json.loads(line)["key"].split("/@")[1] for line in (out / ".partial" / "journal.jsonl").open()]
        assert len(finished) == 3 and not (out / "prepared.json").exists()
        before = len(server.requests)
        again = run(args, tmp_path, endpoint=server.url)
        assert again.returncode == 0, again.stderr
        fetched = {r[1].rsplit("/", 1)[-1] for r in server.requests[before:] if r[0] == "GET" and "/resolve/" in r[1]}
    assert tree(out) == reference(sources) and not (out / ".partial").exists()
    assert not fetched & {name.rsplit("/", 1)[-1] for name in finished}  # finished files were not requested again
    assert fetched == {p.name for p in (sources / "hf-tars" / "data").iterdir()} - {n.rsplit("/", 1)[-1] for n in finished}


def test_official_train_tar_rerun_resumes_at_the_first_unfinished_class_and_says_it_is_unhashed(sources, tmp_path):
    out = tmp_path / "out"
    with serve(sources / "official") as server:
        args = ["prepare", "--archives", server.url, "--out", str(out), "--partial"]
        assert run(args, tmp_path, script=killer("train/n")).returncode == -signal.SIGKILL
        before = len(server.requests)
        again = run(args, tmp_path)
        assert again.returncode == 0, again.stderr
        train = gets(type("S", (), {"requests": server.requests[before:]}), facts.TRAIN_TAR)
    assert len(train) == 1 and train[0][2].startswith("bytes=") and not train[0][2].startswith("bytes=0-")
    assert tree(out) == reference(sources)
    doc = json.loads((out / "prepared.json").read_text())
    record = {c["file"]: c for c in doc["checksums"]}[facts.TRAIN_TAR]
    assert record["md5"] is None and record["one_pass"] is False and record["resumed_at"] > 0
    assert any("checksum not computed" in r for r in doc["unverified_reasons"]) and not doc["verified"]


def test_a_train_tar_that_changed_since_the_killed_run_is_prepared_again_from_its_start(sources, tmp_path):
    out, archives = tmp_path / "out", tmp_path / "official"
    archives.mkdir()
    for p in (sources / "official").iterdir():
        (archives / p.name).write_bytes(p.read_bytes())
    with serve(archives) as server:
        args = ["prepare", "--archives", server.url, "--out", str(out), "--partial"]
        assert run(args, tmp_path, script=killer("train/n")).returncode == -signal.SIGKILL
        os.utime(archives / facts.TRAIN_TAR, ns=(1, 1))  # another ETag: the server holds another version now
        before = len(server.requests)
        again = run(args, tmp_path)
        assert again.returncode == 0, again.stderr
        train = [r for r in server.requests[before:] if r[0] == "GET" and r[1].endswith(facts.TRAIN_TAR)]
    assert f"{facts.TRAIN_TAR} changed since the last run" in again.stdout
    assert [r[2] for r in train][-1] is None  # read again from byte 0, so its MD5 is computed
    assert tree(out) == reference(sources)
    record = {c["file"]: c for c in json.loads((out / "prepared.json").read_text())["checksums"]}[facts.TRAIN_TAR]
    assert record["md5"] == fixtures.md5sum(archives / facts.TRAIN_TAR)


def test_a_resumed_train_tar_decodes_each_image_it_reads(sources, tmp_path):
    """A JPEG cut short in the last class passes the header check; read from an offset (no MD5 will vouch for the
    rest), it is decoded whole, found out and named."""
    import io
    import tarfile

    archives = tmp_path / "official"
    archives.mkdir()
    for p in (sources / "official").iterdir():
        if p.name not in (facts.TRAIN_TAR, "MD5SUMS"):
            (archives / p.name).write_bytes(p.read_bytes())
    with tarfile.open(sources / "official" / facts.TRAIN_TAR) as outer, \
            tarfile.open(archives / facts.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as new:
        members = [(m.name, outer.extractfile(m).read()) for m in outer if m.isfile()]
        for i, (name, data) in enumerate(members):
            if i == len(members) - 1:  # the last class: its first image cut to a third
                with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                    files = [(m.name, inner.extractfile(m).read()) for m in inner if m.isfile()]
                files[0] = (files[0][0], files[0][1][: len(files[0][1]) // 3])
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                    for n, d in files:
                        fixtures.add_file(inner, n, d)
                data = buf.getvalue()
            fixtures.add_file(new, name, data)
    with serve(archives) as server:
        args = ["prepare", "--archives", server.url, "--out", str(tmp_path / "out"), "--partial"]
        assert run(args, tmp_path, script=killer("train/n")).returncode == -signal.SIGKILL
        again = run(args, tmp_path)
    assert again.returncode == 2 and "files are not decodable images" in again.stderr, again.stderr
    assert files[0][0] in again.stderr


def test_an_image_that_does_not_decode_in_a_resumed_train_tar_is_rejected(tmp_path):
    """Read from an offset, no checksum vouches for the rest of the train tar: each image is decoded whole instead."""
    from warmstart.prepare import extract, images

    output = extract.Output(tmp_path / "out", {}, 1, "", None, None, 90)
    good = fixtures.class_images(CLASSES[0], 1)[0]
    broken = good[: len(good) // 3]  # a valid header, then the scan ends: only a full decode notices
    assert images.is_ok(images.kind(broken)) and not images.decodes(broken) and images.decodes(good)
    stats = output.submit([("train/a/1.JPEG", good), ("train/a/2.JPEG", broken)], 0, decode=True).result()
    assert stats["unreadable"] == ["train/a/2.JPEG"] and stats["files"] == 1
    assert output.submit([("train/b/2.JPEG", broken)], 0).result()["files"] == 1  # a checksum vouches: not decoded
    output.close()


def test_a_server_that_ignores_range_restarts_the_file_and_says_so(sources, tmp_path):
    with serve(sources / "official", cut_after=200 << 10, cuts_per_file=1, ignore_range=True) as server:
        out = tmp_path / "out"
        r = run(["prepare", "--archives", server.url + facts.VAL_TAR, "--out", str(out), "--partial"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ignores Range" in r.stdout and f"starting {facts.VAL_TAR} over" in r.stdout
    assert tree(out / "val") == {k[4:]: v for k, v in reference(sources).items() if k.startswith("val/")}


@pytest.mark.parametrize("case", ["no-token", "404", "scheme"])
def test_bad_remote_inputs_are_one_line_and_leave_nothing_complete(sources, tmp_path, case):
    with serve(sources, hf=HUB, token=TOKEN if case == "no-token" else None) as server:
        spec = {"no-token": "hf://datasets/ILSVRC/imagenet-1k", "404": server.url + "official/nothing.tar",
                "scheme": "ftp://example.org/imagenet/"}[case]
        r = run(["prepare", "--archives", spec, "--out", str(tmp_path / "out")], tmp_path, endpoint=server.url,
                token=None if case == "no-token" else TOKEN)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert {"no-token": "HF_TOKEN", "404": "HTTP 404", "scheme": "cannot read ftp:// URLs"}[case] in err
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_the_next_file_downloads_while_the_last_ones_writes_finish(sources, tmp_path, monkeypatch):
    """The link does not idle between files: each part's successor is requested before the part is committed."""
    from warmstart.prepare import extract

    real, seen = extract.Output._commit_first, []
    with serve(sources / "hf-tars") as server:
        def commit(self):
            seen.append((self.pending[0][0], [r[1] for r in server.requests if r[0] == "GET"]))
            real(self)

        monkeypatch.setattr(extract.Output, "_commit_first", commit)
        assert main(["prepare", "--archives", server.url, "--out", str(tmp_path / "out"), "--partial"]) == 0
    order = ["val_images", *(f"train_images_{i}" for i in range(5)), "test_images"]
    assert [key.rsplit("/", 1)[-1].split(".")[0] for key, _ in seen] == order
    for (key, requested), following in zip(seen, order[1:]):
        assert any(following in path for path in requested), (key, following)


def test_credentials_and_signatures_in_a_url_are_never_recorded_or_printed(sources, tmp_path):
    with serve(sources / "official", status_for={f"/{facts.TEST_TARS[0]}": 404}) as server:
        host = server.url.split("//")[1]
        secret = f"http://alice:s3cr3tpw@{host}{facts.VAL_TAR}?X-Amz-Signature=SIGSECRET"
        r = run(["prepare", "--archives", secret, "--out", str(tmp_path / "out"), "--partial"], tmp_path)
        assert r.returncode == 0, r.stderr
        bad = run(["prepare", "--archives", f"http://bob:pw2@{host}nothing.tar?sig=SIG2", "--out",
                   str(tmp_path / "bad")], tmp_path)
    record = (tmp_path / "out" / "prepared.json").read_text()
    for text in (record, r.stdout, r.stderr, bad.stderr):
        assert "s3cr3tpw" not in text and "SIGSECRET" not in text and "pw2" not in text and "SIG2" not in text
    assert f"http://{host}{facts.VAL_TAR}?..." in record and bad.returncode == 2 and "HTTP 404" in bad.stderr


def test_a_folder_url_answering_every_name_with_a_page_holds_nothing(tmp_path):
    (tmp_path / "site").mkdir()
    with serve(tmp_path / "site", status_for={}) as server:
        import httpserver
        real = httpserver.Handler.route

        def soft_404(self):  # every name a 200 web page, as some servers answer a missing file
            self.path_only = self.path
            return self.reply(200, {"Content-Type": "text/html"}, b"<html>not here</html>")

        httpserver.Handler.route = soft_404
        try:
            r = run(["prepare", "--archives", server.url, "--out", str(tmp_path / "out")], tmp_path)
        finally:
            httpserver.Handler.route = real
    assert r.returncode == 2 and "holds none of" in r.stderr and "MD5SUMS line" not in r.stderr, r.stderr


def test_a_plain_log_gets_one_line_per_file_and_a_resumed_split_shows_no_rate(sources, tmp_path):
    with serve(sources, hf=HUB, token=TOKEN) as server:
        args = ["prepare", "--archives", "hf://datasets/ILSVRC/imagenet-1k", "--out", str(tmp_path / "out"), "--partial"]
        assert run(args, tmp_path, endpoint=server.url, script=killer("")).returncode == -signal.SIGKILL
        r = run(args, tmp_path, endpoint=server.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("train_images_3.tar.gz", "train_images_4.tar.gz", "test_images.tar.gz"):
        assert sum(line.startswith(f"data/{name}: ") and " in " in line for line in lines) == 1, r.stdout
    train = next(line for line in lines if line.startswith("train "))
    assert "earlier" in train  # part of train came from the killed run: no made-up files/s
