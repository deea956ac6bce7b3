"""OUT/prepared.json (written last and atomically: its presence means complete), with whether its data is verified
(read back by data/verified.py), and the summary table."""

import json
from collections import Counter
from pathlib import Path

from warmstart import fileio
from warmstart.data.verified import unverified_reasons
from warmstart.version import __version__
from warmstart.prepare import facts


def write_json(path: Path, obj: dict) -> None:
    fileio.write_text(path, json.dumps(obj, indent=1) + "\n")


def write_synsets(root: Path, classes: list[str]) -> None:
    names = facts.synsets()
    fileio.write_text(root / "synsets.txt", "".join(f"{w} {names.get(w, w)}\n" for w in classes))


def tally(records: list[dict]) -> dict[str, dict]:
    """Per split: images, bytes, per-class counts, repairs, from the journal records."""
    splits: dict[str, dict] = {}
    for r in records:
        for d, n in r["counts"].items():
            split, _, cls = d.partition("/")
            s = splits.setdefault(split, {"images": 0, "bytes": 0, "resized_bytes": 0, "classes": Counter(),
                                          "repairs": []})
            s["images"] += n
            if cls:
                s["classes"][cls] += n
        split = r["key"].split("/")[0]
        if split in splits:
            for k in ("bytes", "resized_bytes", "repairs"):
                splits[split][k] += r[k]
    return {s: {**v, "classes": dict(sorted(v["classes"].items()))} for s, v in sorted(splits.items())}


def table(splits: dict[str, dict], seconds: dict[str, float], resized: str | None) -> str:
    head = ["split", "classes", "images", "size"] + ([resized] if resized else []) + ["repaired", "time", "files/s", "MB/s"]
    rows = [head]
    for name, s in splits.items():
        t = seconds.get(name)
        mb = (s["bytes"] or s["resized_bytes"]) / 1e6
        rows.append([name, str(len(s["classes"]) or "-"), f"{s['images']:,}", fileio.human(s["bytes"])]
                    + ([fileio.human(s["resized_bytes"])] if resized else [])
                    + [str(len(s["repairs"])), f"{t:.1f}s" if t else "earlier",
                       f"{s['images'] / t:,.0f}" if t else "-", f"{mb / t:,.0f}" if t else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def manifest(options: dict, splits: dict, checksums: list[dict], missing: list[str], notes: list[str],
             unverified: list[str] = ()) -> dict:
    reasons = unverified_reasons(checksums) + list(unverified)
    return {
        "tool": f"warmstart {__version__}",
        "options": options,
        "verified": not reasons,  # every official archive matched its published MD5 (Kaggle publishes none)
        "unverified_reasons": reasons,
        "checksums": checksums,
        "splits": {k: {"images": v["images"], "bytes": v["bytes"], "resized_bytes": v["resized_bytes"],
                       "classes": v["classes"]} for k, v in splits.items()},
        "repairs": [r for v in splits.values() for r in v["repairs"]],
        "missing": missing,
        "notes": notes,
    }
