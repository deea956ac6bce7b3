"""A loopback S3 endpoint (moto's server) for the shard tests and benchmarks/shards.py; nothing leaves the machine.

    python tests/s3server.py [--delay-ms 20]      prints "PORT n" once it listens, serves until killed

`serve()` is the context manager both use: it starts the server in a subprocess, sets AWS_ENDPOINT_URL and dummy
credentials in os.environ (child processes inherit them) and restores everything after. --delay-ms holds every
request that long before moto sees it: an object store's latency, which is what makes small files slow there.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


class Latency:
    """WSGI middleware: each request waits `delay` seconds; GET /__requests answers how many came so far."""

    def __init__(self, app, delay: float):
        self.app, self.delay, self.count, self.lock = app, delay, 0, threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/__requests":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(self.count).encode()]
        with self.lock:
            self.count += 1
        if self.delay:
            time.sleep(self.delay)
        return self.app(environ, start_response)


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log_request(self, *args, **kwargs):  # werkzeug would print every request
            pass

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args()
    app = Latency(DomainDispatcherApplication(create_backend_app), args.delay_ms / 1000)
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=Quiet)
    print("PORT", server.server_address[1], flush=True)
    server.serve_forever()


ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def serve(delay_ms: float = 0.0):
    """Yields the endpoint URL while the server runs, with os.environ pointing boto3 and LitData at it."""
    proc = subprocess.Popen([sys.executable, __file__, "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT"):
        proc.kill()
        raise RuntimeError(f"the loopback S3 server did not start: {proc.stderr.read()[-2000:]}")
    url = f"http://127.0.0.1:{int(line.split()[1])}"
    env = {**ENV, "AWS_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(folder: Path, bucket: str, prefix: str) -> None:
    """Copy a local folder to s3://bucket/prefix (the bucket is created) through the current endpoint."""
    import boto3

    s3 = boto3.client("s3")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")


def requests(url: str) -> int:
    import urllib.request

    return int(urllib.request.urlopen(url + "/__requests").read())


if __name__ == "__main__":
    main()
