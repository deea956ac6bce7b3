"""Where `prepare --archives` reads its bytes: a local folder, an http(s) URL or a Hugging Face dataset. Each file is
streamed front to back once; a dropped connection is resumed with a Range request at the byte reached, after checking
that the server still serves the same file."""

import concurrent.futures
import http.client
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

import requests
import urllib3

from warmstart.errors import UserError, first_line, shown
from warmstart.prepare import facts

TIMEOUT = (30, 60)  # connect, read (s): a stalled read is retried with Range rather than waited on
BACKOFF = (0.5, 10.0)  # first wait between tries of a failing connection, doubling up to the second
TRIES = 8  # consecutive failures that delivered no new byte before giving up
HF_TARS = [f"train_images_{i}.tar.gz" for i in range(5)] + ["val_images.tar.gz", "test_images.tar.gz"]
# a folder URL cannot be listed: these are the names probed (official archives, then the Hub's tar layout)
KNOWN = [facts.TRAIN_TAR, facts.VAL_TAR, *facts.TEST_TARS, facts.DEVKIT, "MD5SUMS",
         *(f"data/{n}" for n in HF_TARS), *HF_TARS]


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the store root, "/"-separated
    size: int | None  # bytes; None if the server did not say
    sha256: str | None  # the checksum the source publishes (the Hub's LFS sha256), lowercase hex


class Restart(Exception):
    """The server cannot continue this file where it stopped (it ignored Range, answered another ETag/size, or a
    Content-Range that does not start at the byte reached): the caller must start the file over from byte 0."""


class Retry(Exception):
    """A failure worth another try: a short body, or a status a busy server answers (408, 429, 5xx)."""


# what a dropped or stalled connection raises (requests' errors are OSErrors; raw reads raise urllib3's own)
RETRY = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException, Retry)


def kind(e: BaseException) -> str:
    """The short name of a failure: urllib3 wraps the useful one (IncompleteRead) as its last argument, or as the
    reason of a MaxRetryError (a refused connection)."""
    if isinstance(e, Retry):
        return str(e)
    inner = e.args[-1] if e.args and isinstance(e.args[-1], BaseException) else e
    reason = getattr(inner, "reason", None)
    return type(reason if isinstance(reason, BaseException) else inner).__name__


class Stream:
    """A file read front to back from `position`; this base reads a local file."""

    def __init__(self, f, position: int):
        self.f, self.position = f, position
        self.network_seconds, self.resumes = 0.0, []

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.position += len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Store:
    where: str
    remote = False
    _entries: dict[str, Entry] | None = None

    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = self._list()
        return self._entries

    def _list(self) -> dict[str, Entry]:
        raise NotImplementedError

    def open(self, name: str, offset: int = 0, on_resume=None) -> Stream:
        raise NotImplementedError

    def path(self, name: str) -> Path | None:
        return None


class LocalStore(Store):
    """A folder (every regular file under it) or one file."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise UserError(f"--archives {root} does not exist; point it at the download folder, "
                            "an http(s):// URL or hf://datasets/OWNER/NAME")
        self.where = str(self.root.resolve())
        self.folder = self.root if self.root.is_dir() else self.root.parent

    def _list(self) -> dict[str, Entry]:
        if not self.root.is_dir():
            return {self.root.name: Entry(self.root.name, self.root.stat().st_size, None)}
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            # hidden entries are not downloads: huggingface-cli keeps its .cache/huggingface/ metadata there
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(f for f in filenames if not f.startswith(".")):
                p = os.path.join(dirpath, f)
                # a link to a file is followed (huggingface-cli's cache links snapshots to blobs); os.walk walks no
                # link to a folder (no loops); a dangling link or a device is skipped
                if os.path.isfile(p):
                    name = os.path.relpath(p, self.root).replace(os.sep, "/")
                    found[name] = Entry(name, os.path.getsize(p), None)
        return found

    def open(self, name: str, offset: int = 0, on_resume=None) -> Stream:
        f = open(self.folder / name, "rb", buffering=0)
        f.seek(offset)
        return Stream(f, offset)

    def path(self, name: str) -> Path | None:
        return self.folder / name


def redact(url: str) -> str:
    """A URL as messages and records show it: no user:password, no query (a signed link's signature), escaped."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return shown(f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else ""))


def total_size(r: requests.Response) -> int | None:
    """The whole file's size from a 206's Content-Range or a 200's Content-Length."""
    if r.status_code == 206:
        m = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", ""))
        return int(m[1]) if m else None
    length = r.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


class HttpStore(Store):
    """A folder URL (ending in "/": the known names are probed, HTTP cannot list) or one file's URL."""

    remote = True

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        if urlsplit(url).path in ("", "/") and not url.endswith("/"):
            url += "/"
        self.url, self.where = url, redact(url)
        self.session = requests.Session()  # requests drops Authorization when a redirect leaves the host
        # identity: a server that gzips a .tar.gz on the fly would change the bytes and the sizes
        self.session.headers.update({"Accept-Encoding": "identity", **(headers or {})})

    def file_url(self, name: str) -> str:
        return urljoin(self.url, quote(name)) if self.url.endswith("/") else self.url

    def _probe(self, url: str) -> tuple[int, requests.Response]:
        try:
            r = self.session.head(url, allow_redirects=True, timeout=TIMEOUT)
            if r.status_code == 405:  # HEAD refused: ask for one byte instead
                r = self.session.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=TIMEOUT)
                r.close()
        except requests.RequestException as e:
            raise UserError(f"cannot reach {redact(url)} ({kind(e)}: {first_line(e)}); check the URL and the network") from None
        return r.status_code, r

    def _list(self) -> dict[str, Entry]:
        if not self.url.endswith("/"):
            status, r = self._probe(self.url)
            if status not in (200, 206):
                raise self.status_error(self.url, status)
            if r.headers.get("Content-Type", "").startswith("text/html"):
                raise UserError(f"{self.where} is a web page, not an archive; end a folder's URL with '/'")
            name = unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])
            return {name: Entry(name, total_size(r), None)}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            probes = dict(zip(KNOWN, pool.map(self._probe, map(self.file_url, KNOWN))))
        # a server that answers every name with a page (a "soft 404") has none of them
        found = {n: Entry(n, total_size(r), None) for n, (status, r) in probes.items()
                 if status in (200, 206) and not r.headers.get("Content-Type", "").startswith("text/html")}
        # 401/403 for a missing name is how a bucket that forbids listing answers: absent once something was found
        odd = [(n, s) for n, (s, _) in probes.items()
               if s not in (200, 206, 404, 410) and (s not in (401, 403) or not found)]
        if odd:
            raise self.status_error(self.file_url(odd[0][0]), odd[0][1])
        if not found:
            raise UserError(f"{self.where} holds none of {', '.join(KNOWN)} (HTTP 404 for each); a URL cannot be "
                            "listed, so point at the folder holding them or at one file's URL")
        return found

    def status_error(self, url: str, status: int) -> UserError:
        url = redact(url)
        if status in (401, 403):
            return UserError(self.denied(url, status))
        if status == 404:
            return UserError(f"not found (HTTP 404): {url}")
        return UserError(f"{url} answered HTTP {status}; check the URL, or try again later")

    def denied(self, url: str, status: int) -> str:
        return f"{url}: access denied (HTTP {status}): the server refused access; check the URL (a signed link expires)"

    def open(self, name: str, offset: int = 0, on_resume=None) -> Stream:
        entry = self.entries().get(name)
        return HttpStream(self, name, self.file_url(name), offset, entry.size if entry else None, on_resume)


class HttpStream(Stream):
    """A GET read as it arrives. A dropped connection, a timeout or a short body re-requests the rest with Range,
    and goes on only if the answer continues the same file at the byte reached: else Restart."""

    def __init__(self, store: HttpStore, name: str, url: str, offset: int, size: int | None, on_resume=None):
        super().__init__(None, offset)
        self.store, self.name, self.url, self.size, self.on_resume = store, name, url, size, on_resume
        self.shown, self.limit = redact(url), size  # limit: the size the listing gave; no file is read past it
        self.response: requests.Response | None = None
        self.version = None  # (strong ETag, Last-Modified, size) of the first answer: what a resume must match
        self.failures, self.cause, self.done = 0, None, False
        self._retrying(self._request)

    def _retrying(self, step):
        while True:
            try:
                return step()
            except RETRY as e:
                self._drop()
                self.failures += 1
                self.cause = self.cause or e  # what the resume line reports; `e` is what a give-up reports
                if self.failures >= TRIES:
                    detail = kind(e) if isinstance(e, Retry) else f"{kind(e)}: {first_line(e)}"
                    raise UserError(f"{self.shown}: gave up at byte {self.position:,} after {TRIES} failed tries "
                                    f"({detail}); rerunning the command resumes") from None
                time.sleep(min(BACKOFF[1], BACKOFF[0] * 2 ** (self.failures - 1)))

    def _request(self) -> None:
        first = self.version is None
        t = time.perf_counter()
        try:
            r = self.store.session.get(self.url, headers={"Range": f"bytes={self.position}-"} if self.position else {},
                                       stream=True, timeout=TIMEOUT)
        finally:
            self.network_seconds += time.perf_counter() - t
        if r.status_code in (408, 429) or r.status_code >= 500:
            r.close()
            raise Retry(f"HTTP {r.status_code}")
        if r.status_code == 416:  # nothing at or after this byte
            r.close()
            if first:
                self.done = True
                return
            raise Restart(f"{self.shown} answered 416 to a Range request from byte {self.position:,} (the file shrank?); "
                          "restarting the file")
        if r.status_code not in (200, 206):
            r.close()
            raise self.store.status_error(self.url, r.status_code)
        if self.position and r.status_code == 200:
            r.close()
            raise Restart(f"{self.shown} ignores Range requests (answered 200); restarting the file")
        if r.status_code == 206:
            cr = r.headers.get("Content-Range", "")
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", cr)
            if not m or int(m[1]) != self.position:
                r.close()
                raise Restart(f"{self.shown} answered Content-Range {cr!r} to a request from byte {self.position:,}; "
                              "restarting the file")
        tag = r.headers.get("ETag")
        # a weak ETag never compares equal under the strong comparison a byte range needs: it identifies nothing
        etag = None if tag is None or tag.startswith("W/") else tag
        version = (etag, r.headers.get("Last-Modified"), total_size(r))
        if first:
            if None not in (self.limit, version[2]) and version[2] != self.limit:
                r.close()
                raise UserError(f"{self.shown}: the file list says {self.limit:,} bytes but the server sends "
                                f"{version[2]:,}; the listing and the file disagree, try again later")
            self.version, self.size = version, version[2] if version[2] is not None else self.size
        else:
            was_etag, was_modified, _ = self.version  # the same file: its ETag, else its Last-Modified; and its size
            same = ([("ETag", was_etag, etag)] if was_etag else
                    [("Last-Modified", was_modified, version[1])] if was_modified else [])
            if None not in (self.size, version[2]):
                same.append(("size", self.size, version[2]))
            for what, was, now in same:
                if now != was:
                    r.close()
                    raise Restart(f"{self.shown} changed since the read began ({what} {was} became {now}); "
                                  "restarting the file")
            line = f"{self.name}: connection dropped at byte {self.position:,} ({kind(self.cause)}); resumed with Range"
            line += f" after {self.failures} tries" if self.failures > 1 else ""
            self.resumes.append(line)
            if self.on_resume:
                self.on_resume(line)
        self.response, self.cause = r, None

    def _read(self, n: int) -> bytes:
        if self.response is None:
            if self.done:
                return b""
            self._request()
            if self.done:
                return b""
        if self.size is not None:  # never past the file's size, whatever a server keeps sending
            n = min(n, self.size - self.position)
            if n <= 0:
                self.close()
                return b""
        t = time.perf_counter()
        try:
            data = self.response.raw.read(n, decode_content=False)  # the file's bytes, whatever Content-Encoding says
        finally:
            self.network_seconds += time.perf_counter() - t
        if not data and self.size is not None and self.position < self.size:
            raise Retry(f"the body ended at byte {self.position:,} of {self.size:,}")
        self.position += len(data)
        if data:
            self.failures = 0
        else:
            self.close()
        return data

    def read(self, n: int) -> bytes:
        return self._retrying(lambda: self._read(n))

    def _drop(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None

    def close(self) -> None:
        self._drop()
        self.done = True


class HfStore(HttpStore):
    """hf://datasets/OWNER/NAME[@REVISION]: the Hub's file list (sizes, LFS sha256) and each file's resolve URL,
    streamed like any URL with the user's token (requests drops it on the redirect to the CDN's host)."""

    def __init__(self, spec: str, endpoint: str | None = None, token: str | None = None):
        import huggingface_hub
        from huggingface_hub import constants

        repo, at, rev = spec.split("://", 1)[-1].partition("@")
        parts = repo.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "datasets" or not all(parts) or at and not rev:
            raise UserError(f"--archives {spec}: expected hf://datasets/OWNER/NAME or "
                            "hf://datasets/OWNER/NAME@REVISION (only datasets are read)")
        self.repo, self.rev = f"{parts[1]}/{parts[2]}", rev or "main"
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")  # HF_ENDPOINT, read when huggingface_hub loads
        self.token = token if token is not None else huggingface_hub.get_token()
        super().__init__(f"hf://datasets/{self.repo}@{self.rev}",
                         {"Authorization": f"Bearer {self.token}"} if self.token else None)

    def file_url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, name, repo_type="dataset", revision=self.rev, endpoint=self.endpoint)

    def _list(self) -> dict[str, Entry]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.hf_api import RepoFile

        try:
            tree = HfApi(endpoint=self.endpoint).list_repo_tree(self.repo, recursive=True, repo_type="dataset",
                                                                 revision=self.rev, token=self.token or False)
            files = [f for f in tree if isinstance(f, RepoFile)]
        except HfHubHTTPError as e:
            raise self.hub_error(e) from None
        except Exception as e:  # the hub client's transport errors: httpx, httpx2 or requests by version
            if not isinstance(e, OSError) and not type(e).__module__.startswith(("httpx", "requests", "urllib3")):
                raise
            raise UserError(f"{self.where}: cannot reach the Hub at {self.endpoint} ({kind(e)}: {first_line(e)}); "
                            "check the network (HF_ENDPOINT is honoured, for a mirror)") from None
        return {f.path: Entry(f.path, f.size, f.lfs.sha256.lower() if f.lfs else None) for f in files}

    def hub_error(self, e) -> UserError:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        status = e.response.status_code if e.response is not None else None
        if isinstance(e, RevisionNotFoundError):
            return UserError(f"{self.where}: revision {self.rev!r} not found in dataset {self.repo} (HTTP {status}); "
                             "check what follows '@' (a branch, tag or commit)")
        if isinstance(e, RepositoryNotFoundError) and not isinstance(e, GatedRepoError):
            return UserError(f"{self.where}: dataset {self.repo} not found (HTTP {status}); check OWNER/NAME "
                             "(a private dataset also needs HF_TOKEN or `huggingface-cli login`)")
        if status in (401, 403) or isinstance(e, GatedRepoError):
            return UserError(self.denied(self.where, status))
        return UserError(f"{self.where}: the Hub answered HTTP {status} ({first_line(e)}); try again later")

    def denied(self, url: str, status: int) -> str:
        return (f"{url}: access denied (HTTP {status}): set HF_TOKEN (or run `huggingface-cli login`) and accept the "
                f"dataset's terms on {self.endpoint}/datasets/{self.repo}")


def open_store(spec: str) -> Store:
    """A local path, an http(s) URL (a folder's ends in "/") or hf://datasets/OWNER/NAME[@REVISION]."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if not m:
        return LocalStore(spec)
    scheme = m[1].lower()
    if scheme in ("http", "https"):
        return HttpStore(spec)
    if scheme == "hf":
        return HfStore(spec)
    raise UserError(f"--archives {spec}: cannot read {scheme}:// URLs; give a local folder, an http(s):// URL "
                    "or hf://datasets/OWNER/NAME[@REVISION]")
