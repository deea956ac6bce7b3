"""Shards against single files, for the same images through warmstart's training input pipeline (issue 15).

    python benchmarks/shards.py [--data ../shared/data/imagenette-dev] [--delay-ms 20] [--workers 2] [--rounds 3]

Two comparisons, each alternated in rounds (the order flips every round, a pause before each), every round printed:

1. local disk: `--data FOLDER` against `--data SHARDS` (`prepare --shards` of that folder);
2. an S3 endpoint on the loopback (tests/s3server.py: moto) that holds every request --delay-ms, as an object store
   far away does: `--data s3://…` shards (a fresh chunk cache each round) against the same images as one object
   each (what a folder of small files becomes in object storage), fetched with one GET per image.

Both sides run the same dataset code (ImageDataset's crop-aware decode); only where the bytes come from differs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import s3server  # noqa: E402  (tests/: the loopback endpoint the tests use too)
from warmstart.bench import loader_rate, rounds_summary  # noqa: E402
from warmstart.data.shard_reader import open_shard_splits  # noqa: E402
from warmstart.data.dataset import ImageDataset, ShardDataset, make_loader  # noqa: E402
from warmstart.data.folder import index_folder  # noqa: E402
from warmstart.data.sampler import TrainSampler  # noqa: E402


class S3Objects(ImageDataset):
    """The small-files case in object storage: every image its own object, one GET each."""

    def __init__(self, bucket: str, prefix: str, samples, **kw):
        super().__init__(Path("."), samples, **kw)
        self.bucket, self.prefix, self.client, self.pid = bucket, prefix, None, None

    def read(self, index: int):
        if self.pid != os.getpid():  # one client per worker process
            import boto3

            self.client, self.pid = boto3.client("s3"), os.getpid()
        key = f"{self.prefix}/{self.paths[index].decode()}"
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), int(self.labels[index])


def rate(dataset, args, seed: int) -> float:
    sampler = TrainSampler(len(dataset), seed=seed, multiple_of=args.batch_size)
    sampler.set_epoch(0, args.img_size)
    loader = make_loader(dataset, sampler, batch_size=args.batch_size, workers=args.workers, train=True)
    try:
        return loader_rate(loader, "", skip=max(1, args.workers))
    finally:
        del loader


def compare(name: str, contestants: dict, args) -> dict:
    rounds = []
    for r in range(args.rounds):
        got = {}
        for who in (list(contestants) if r % 2 == 0 else list(contestants)[::-1]):
            time.sleep(args.settle)
            got[who] = rate(contestants[who](r), args, seed=r)
        a, b = list(contestants)
        rounds.append({**got, "ratio": got[a] / got[b]})
        print(f"{name} round {r + 1}/{args.rounds}: {a} {got[a]:.0f} img/s, {b} {got[b]:.0f} img/s, "
              f"ratio {got[a] / got[b]:.2f}x", flush=True)
    return {**rounds_summary(rounds, *contestants), "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "imagenette-dev",
                   help="a dataset folder with train/ (default: shared/data/imagenette-dev)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="latency of every S3 request (default: 20)")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="warmstart-bench-shards-"))
    try:
        pack = work / "shards"
        subprocess.run([sys.executable, "-m", "warmstart", "prepare", "--from-folder", str(args.data), "--shards",
                        str(pack)], check=True, stdout=subprocess.DEVNULL)
        train = args.data / "train"
        _, samples = index_folder(train)
        reader = open_shard_splits(str(pack))[2]["train"]
        print(f"{len(samples)} training images of {args.data}, {args.img_size} px, {args.workers} worker(s), "
              f"batch {args.batch_size}; shards: {len(reader.files)} chunk(s)")
        results = {"local": compare("local", {
            "shards": lambda r: ShardDataset(reader, train=True),
            "folder": lambda r: ImageDataset(train, samples, train=True)}, args)}

        with s3server.serve(delay_ms=args.delay_ms):
            s3server.upload(pack, "bench", "shards")
            s3server.upload(train, "bench", "files")

            def remote_shards(r: int):
                cache = work / f"cache{r}"  # a cold cache each round: every chunk comes over the wire
                return ShardDataset(open_shard_splits("s3://bench/shards", cache_dir=cache)[2]["train"], train=True)

            results["s3"] = compare(f"s3 ({args.delay_ms:g} ms)", {
                "shards": remote_shards,
                "objects": lambda r: S3Objects("bench", "files", samples, train=True)}, args)
        for where, res in results.items():
            print(f"{where}: shards {res['shards_img_s']:.0f} img/s vs {list(res)[1].split('_')[0]} "
                  f"{list(res.values())[1]:.0f} img/s (best rounds): {res['ratio']:.2f}x, median ratio "
                  f"{res['median_ratio']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({**vars(args) | {"data": str(args.data), "json": None}, **results},
                                            indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
