"""The output folder while it is being written: checks, repairs and writes run on worker threads
(resizing on worker processes), each unit (a train class, a whole val or test split) is written
under OUT/.partial and renamed into place when complete, and a journal of finished units lets a
rerun skip them."""

import json
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from warmstart import fileio, untrusted
from warmstart.errors import UserError
from warmstart.prepare import images

INFLIGHT_BYTES = 512 << 20  # bound on image bytes queued for the writers, to cap memory
RESIZE_BATCH = 32  # images per worker-process task; amortises pickling and IPC


def _read_options(path: Path) -> dict | None:
    """.partial's options.json, or None when missing or damaged (bounded, typed): the run then starts afresh."""
    try:
        return untrusted.read_json(path, path.name)
    except UserError:
        return None


def _read_journal(path: Path) -> str:
    try:  # a record per finished unit: a few thousand lines, far below this limit
        return untrusted.read_text(path, path.name, limit=2**28)
    except UserError:
        return ""  # nothing is taken as done: every unit is redone


def _parse_record(line: str) -> dict | None:
    """A journal line as _commit_first writes it, or None: whatever else it holds, its unit is redone."""
    try:
        r = untrusted.parse_json(line, "a journal line")
    except UserError:
        return None
    ints = all(type(r.get(k)) is int for k in ("files", "bytes", "resized_bytes"))
    counts = isinstance(r.get("counts"), dict) and all(type(n) is int for n in r["counts"].values())
    lists = all(isinstance(r.get(k), list) for k in ("repairs", "unreadable"))
    return r if isinstance(r.get("key"), str) and ints and counts and lists else None


class Output:
    def __init__(self, root: Path, options: dict, workers: int, full_dir: str | None, resized_dir: str | None,
                 resize: int | None, quality: int):
        self.root, self.tmp = root, root / ".partial"
        self.full_dir, self.resized_dir, self.resize, self.quality = full_dir, resized_dir, resize, quality
        self.journal = self.tmp / "journal.jsonl"
        self.done: dict[str, dict] = {}
        options_file = self.tmp / "options.json"
        if _read_options(options_file) == options and self.journal.is_file():
            for line in _read_journal(self.journal).splitlines():
                record = _parse_record(line)
                if record:  # else a torn last line (a kill), or not a record this writes: the unit is redone
                    self.done[record["key"]] = record
            for p in self.tmp.iterdir():  # half-written units (and temp files) of the killed run are redone from scratch
                if p.is_dir():
                    shutil.rmtree(p)
                elif p not in (options_file, self.journal):
                    p.unlink()
            self.rewrite_journal()  # drops a torn line
        else:  # a fresh start, or different options: what is under .partial cannot be trusted
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            fileio.write_text(options_file, json.dumps(options))
        self.threads = ThreadPoolExecutor(workers, thread_name_prefix="write")
        # forkserver: forking while the reader and writer threads hold locks could deadlock the children
        self.procs = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) if resize else None
        self.inflight: deque[tuple[Future, int]] = deque()
        self.inflight_bytes = 0
        self.pending: deque[tuple[str, list[str], list[Future], dict]] = deque()
        self.made: set[str] = set()  # folders known to exist
        self.tmp_str = str(self.tmp)
        self.log = open(self.journal, "a")
        self.write_seconds, self.lock = 0.0, threading.Lock()  # the writers' time, for the summary

    def _path(self, prefix: str, rel: str, stage: str) -> str:
        path = os.path.join(self.tmp_str, stage, prefix, rel)  # plain strings: this runs once per image
        parent = path.rpartition("/")[0]
        if parent not in self.made:
            os.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        return path

    def _write(self, files: list[tuple[str, bytes | memoryview | str]], stage: str = "", decode: bool = False) -> dict:
        """Runs on a writer thread. files: (path relative to the output root, bytes or source path); decode: check
        that each decodes whole (files no checksum vouches for), else it is unreadable."""
        t0 = time.perf_counter()
        try:
            return self._write_files(files, stage, decode)
        finally:
            with self.lock:
                self.write_seconds += time.perf_counter() - t0

    def _write_files(self, files: list[tuple[str, bytes | memoryview | str]], stage: str, decode: bool) -> dict:
        stats = {"files": 0, "bytes": 0, "resized_bytes": 0, "repairs": [], "unreadable": [], "counts": Counter()}
        jobs = []
        for rel, data in files:
            if isinstance(data, str):
                with open(data, "rb") as f:
                    data = f.read()
            kind = images.kind(data)
            if decode and images.is_ok(kind) and not images.decodes(data):
                stats["unreadable"].append(rel)
                continue
            if not images.is_ok(kind):
                if self.full_dir is not None:  # the resized copy re-encodes every file anyway
                    data = images.repair(data)
                    if data is None:
                        stats["unreadable"].append(rel)
                        continue
                stats["repairs"].append({"file": rel, "was": kind})
            if self.full_dir is not None:
                images.write_file(self._path(self.full_dir, rel, stage), data)
                stats["bytes"] += len(data)
            if self.resized_dir is not None:
                jobs.append((rel, bytes(data), self._path(self.resized_dir, rel, stage)))
            stats["files"] += 1
            stats["counts"][rel.rpartition("/")[0]] += 1
        batches = [jobs[i : i + RESIZE_BATCH] for i in range(0, len(jobs), RESIZE_BATCH)]
        futures = [self.procs.submit(images.write_resized, [j[1:] for j in b], self.resize, self.quality) for b in batches]
        for batch, future in zip(batches, futures):
            for (rel, _, _), size in zip(batch, future.result()):
                if size >= 0:
                    stats["resized_bytes"] += size
                elif self.full_dir is None:  # only the resized copy was asked for, and it failed
                    stats["unreadable"].append(rel)
                    stats["repairs"] = [r for r in stats["repairs"] if r["file"] != rel]
                    stats["files"] -= 1
                    stats["counts"][rel.rpartition("/")[0]] -= 1
        return stats

    def submit(self, files: list[tuple[str, bytes | memoryview | str]], nbytes: int, stage: str = "",
               decode: bool = False) -> Future:
        """Queue files for writing (under .partial/STAGE when given); blocks while too many image bytes are queued."""
        while self.inflight and self.inflight_bytes > INFLIGHT_BYTES:
            future, n = self.inflight.popleft()
            future.result()
            self.inflight_bytes -= n
        future = self.threads.submit(self._write, files, stage, decode)
        self.inflight.append((future, nbytes))
        self.inflight_bytes += nbytes
        self.settle()
        return future

    def commit(self, key: str, dirs: list[str], futures: list[Future], stage: str = "", **extra) -> None:
        """Once `futures` are done, rename `dirs` from .partial into place and journal the unit. With a stage (a part
        whose files join class folders other parts fill too), every file under .partial/STAGE moves into place."""
        self.pending.append((key, dirs, futures, stage, extra))
        self.settle()

    def settle(self, block: bool = False) -> None:
        """Commit finished units in order; with block, wait for all of them."""
        while self.pending and (block or all(f.done() for f in self.pending[0][2])):
            self._commit_first()
        if block:
            while self.inflight:
                self.inflight.popleft()[0].result()
            self.inflight_bytes = 0

    def _commit_first(self) -> None:
        key, dirs, futures, stage, extra = self.pending.popleft()
        record = {"key": key, "files": 0, "bytes": 0, "resized_bytes": 0, "repairs": [], "unreadable": [],
                  "counts": Counter(), **extra}
        for future in futures:
            for k, v in future.result().items():
                record[k] += v
        if stage:
            self._merge(stage)
        for prefix in (p for p in (self.full_dir, self.resized_dir) if p is not None and not stage):
            for d in dirs:
                src, dst = self.tmp / prefix / d, self.root / prefix / d
                if str(dst.parent) not in self.made:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self.made.add(str(dst.parent))
                try:
                    os.replace(src, dst)
                except FileNotFoundError:  # no file of this unit was writable (all undecodable)
                    pass
                except OSError:  # dst left by a run killed between rename and journal, or a failed checksum
                    shutil.rmtree(dst)
                    os.replace(src, dst)
        self.done[key] = record
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def _merge(self, stage: str) -> None:
        """Move every file of .partial/STAGE into place; a rerun after a kill half-way moves the rest (or rewrites)."""
        root = os.path.join(self.tmp_str, stage)  # absent when no file of the part could be written
        for dirpath, _, files in os.walk(root):
            dst = os.path.join(str(self.root), os.path.relpath(dirpath, root))
            if files and dst not in self.made:
                os.makedirs(dst, exist_ok=True)
                self.made.add(dst)
            for f in files:
                os.replace(os.path.join(dirpath, f), os.path.join(dst, f))
        shutil.rmtree(root, ignore_errors=True)

    def drop(self, futures: list[Future], dirs: list[str], stage: str) -> None:
        """Forget a part that must start over: let its writes end, then remove what they wrote (under .partial/STAGE,
        or its `dirs` there)."""
        for f in futures:
            f.exception()
        self.inflight = deque(i for i in self.inflight if i[0] not in futures)
        self.inflight_bytes = sum(n for _, n in self.inflight)
        prefixes = [p for p in (self.full_dir, self.resized_dir) if p is not None]
        for path in [self.tmp / stage] if stage else [self.tmp / p / d for p in prefixes for d in dirs]:
            shutil.rmtree(path, ignore_errors=True)
        self.made.clear()

    def rewrite_journal(self) -> None:
        fileio.write_text(self.journal, "".join(json.dumps(r) + "\n" for r in self.done.values()))

    def discard(self, split: str) -> None:
        """Drop a split whose archive failed its checksum: its journaled units, so a rerun redoes them, then its
        folders already moved into place (train classes are, as each finishes), so none of it looks verified."""
        self.done = {k: r for k, r in self.done.items() if k.split("/")[0] != split}
        self.log.close()
        self.rewrite_journal()  # first: a kill between the two must not leave journaled units without folders
        self.log = open(self.journal, "a")
        for prefix in (p for p in (self.full_dir, self.resized_dir) if p is not None):
            if (self.root / prefix / split).exists():
                shutil.rmtree(self.root / prefix / split)
        self.made.clear()

    def close(self) -> None:
        """Let the workers finish what was queued (at most INFLIGHT_BYTES) and keep every complete unit,
        after an interrupt or error too: less to redo on the rerun."""
        self.threads.shutdown()
        if self.procs:
            self.procs.shutdown()
        while self.pending and all(f.exception() is None for f in self.pending[0][2]):
            self._commit_first()
        self.log.close()

    def finish(self) -> None:
        """The output is complete: nothing is left under .partial."""
        self.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
