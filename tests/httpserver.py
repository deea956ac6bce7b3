"""A loopback HTTP server for the store tests and the streaming benchmark: the files under a folder, with Range,
strong ETags and the ways a real server misbehaves (cut connections, Range ignored, latency, a bandwidth cap, a
bearer token, forced statuses), and optionally the two Hugging Face Hub routes huggingface_hub and the stores use.

    with serve(root, cut_after=1 << 20, cuts_per_file=5) as server:
        ... server.url ("http://127.0.0.1:PORT/"), server.requests: (method, path, Range or None, status) ...

No third-party imports: the benchmark imports this file by path.
"""

import contextlib
import email.utils
import hashlib
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

CHUNK = 64 << 10
PAGE = 50  # tree entries per page: the Hub pages its listings with a Link header, so must the emulation
LFS = (".tar", ".gz", ".zip", ".parquet")  # what the emulated Hub stores in LFS (a sha256 in the listing)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of probes must not overflow the listen backlog (a dropped SYN waits 1 s)

    def __init__(self, root: Path, token: str | None = None, cut_after: int | None = None,
                 cuts_per_file: int | None = None, ignore_range: bool = False, latency: float = 0.0,
                 bandwidth: float | None = None, hf: dict | None = None, redirect: bool | str = False,
                 status_for: dict[str, int] | None = None, head: bool = True, range_shift: int = 0):
        """hf: {repo_id: {revision: subfolder of root}}; redirect: resolve answers 302 to /cdn/<subfolder>/<path>
        on this server (True) or on the server whose base URL it is (a str); head=False: HEAD answers 405;
        range_shift: a Range from byte a is answered from a + range_shift (said so in Content-Range)."""
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = Path(root).resolve()
        self.token, self.cut_after, self.cuts_per_file = token, cut_after, cuts_per_file
        self.ignore_range = ignore_range
        self.latency, self.bandwidth, self.hf, self.redirect = latency, bandwidth, hf or {}, redirect
        self.status_for, self.head, self.range_shift = status_for or {}, head, range_shift
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.auth: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request
        self.lock = threading.Lock()
        self.served: dict[str, int] = {}  # path -> GETs answered, for cuts_per_file
        self.sha256: dict[tuple, str] = {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()  # a quick close()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up (a timeout, a close) is routine here
            super().handle_error(request, client_address)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def serve(root: Path, **options):
    server = Server(root, **options)
    try:
        yield server
    finally:
        server.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' connection pool expects
    server: Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.route()

    def do_GET(self) -> None:
        self.route()

    def reply(self, status: int, headers: dict | None = None, body: bytes = b"", length: int | None = None) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path_only, self.headers.get("Range"), status))
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def route(self) -> None:
        s, url = self.server, urlsplit(self.path)
        self.path_only = path = unquote(url.path)
        auth = self.headers.get("Authorization")
        with s.lock:
            s.auth.append((path, auth))
        if s.latency:
            time.sleep(s.latency)
        if path in s.status_for:
            return self.reply(s.status_for[path])
        if self.command == "HEAD" and not s.head:
            return self.reply(405)
        if s.token and not path.startswith("/cdn/") and auth != f"Bearer {s.token}":
            # the Hub's own answers, which huggingface_hub turns into its error classes
            bad = {"X-Error-Message": "Invalid credentials in Authorization header"}
            return self.reply(401, (bad if auth else {"X-Error-Code": "GatedRepo"}) if s.hf else {})
        # the revision is quoted whole ("refs%2Fconvert%2Fparquet"): match the raw path
        if s.hf and (m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)", url.path)):
            return self.tree(unquote(m[1]), unquote(m[2]), url)
        if s.hf and (m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)):
            folder = self.repo(unquote(m[1]), unquote(m[2]))
            if folder is None:
                return
            rel = f"{folder}/{unquote(m[3])}"
            if s.redirect:  # the Hub sends LFS files to a CDN on another host, with a signed URL
                base = s.url if s.redirect is True else s.redirect
                return self.reply(302, {"Location": f"{base}cdn/{quote(rel)}?signature=x"})
            return self.file(rel)
        return self.file(path.removeprefix("/cdn/").lstrip("/"))

    def repo(self, repo_id: str, rev: str) -> str | None:
        revisions = self.server.hf.get(repo_id)
        if revisions is None or rev not in revisions:
            code = "RepoNotFound" if revisions is None else "RevisionNotFound"
            self.reply(404, {"X-Error-Code": code}, json.dumps({"error": code}).encode())
            return None
        return revisions[rev]

    def tree(self, repo_id: str, rev: str, url) -> None:
        s = self.server
        folder = self.repo(repo_id, rev)
        if folder is None:
            return
        base, items = s.root / folder, []
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if p.is_dir():
                items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel})
                continue
            st = p.stat()
            item = {"type": "file", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": st.st_size, "path": rel}
            if p.suffix in LFS:
                key = (p, st.st_size, st.st_mtime_ns)
                if key not in s.sha256:
                    s.sha256[key] = hashlib.sha256(p.read_bytes()).hexdigest()
                item["lfs"] = {"oid": s.sha256[key], "size": st.st_size, "pointerSize": 134}
            items.append(item)
        start = int(parse_qs(url.query).get("cursor", ["0"])[0])
        headers = {"Content-Type": "application/json"}
        if start + PAGE < len(items):
            following = f"http://{self.headers['Host']}{url.path}?recursive=True&cursor={start + PAGE}"
            headers["Link"] = f'<{following}>; rel="next"'
        self.reply(200, headers, json.dumps(items[start : start + PAGE]).encode())

    def file(self, rel: str) -> None:
        s = self.server
        p = (s.root / rel).resolve()
        if not p.is_relative_to(s.root) or not p.is_file():
            return self.reply(404)
        st = p.stat()
        size, start, status = st.st_size, 0, 200
        headers = {"ETag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"', "Accept-Ranges": "bytes",
                   "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True)}
        end = size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m and not s.ignore_range:
            start, end = int(m[1]) + s.range_shift, min(int(m[2]), size - 1) if m[2] else size - 1
            if start >= size:
                return self.reply(416, {"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        length = end - start + 1
        send = length
        if self.command == "GET" and s.cut_after is not None:
            with s.lock:
                s.served[rel] = n = s.served.get(rel, 0) + 1
            if s.cuts_per_file is None or n <= s.cuts_per_file:
                send = min(s.cut_after, length)
        self.reply(status, headers, length=length)
        if self.command != "GET":
            return
        cut = send < length
        try:
            with open(p, "rb") as f:
                f.seek(start)
                while send > 0 and (chunk := f.read(min(CHUNK, send))):
                    self.wfile.write(chunk)
                    send -= len(chunk)
                    if s.bandwidth:
                        time.sleep(len(chunk) / s.bandwidth)
            if cut:  # the headers promised `length` bytes: end the connection short of them
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client went away
            cut = True
        self.close_connection = self.close_connection or cut
