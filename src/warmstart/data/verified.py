"""Whether a dataset is verified: `warmstart prepare` checks every official ILSVRC2012 archive against its published
MD5 and records the verdict, in prepared.json (folders) or warmstart.json (shards). This is the one reader of that
verdict: `reason` decides for either record, and training shows it through `Splits.warning` (data/sources.py)."""

import re
from pathlib import Path

from warmstart import untrusted
from warmstart.errors import UserError

# The published MD5 of each official archive (prepare/facts.MD5 is this table): an archive given that differs was
# accepted only by --partial, and its data is unverified.
OFFICIAL_MD5 = {
    "ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
    "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
    "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf",
}


def unverified_reasons(checksums: list[dict]) -> list[str]:
    """Official archives (train, val, devkit) whose MD5 is not the published one: only --partial accepts them.
    Judged from the computed MD5 and OFFICIAL_MD5, so a record journaled by an older version counts too."""
    return [f"{c['file']} does not match its official MD5" for c in checksums
            if c.get("md5") and OFFICIAL_MD5.get(c["file"], c["md5"]) != c["md5"]] + [
        f"{c['file']} does not match the SHA-256 {c.get('published_by')} lists" for c in checksums
        if c.get("sha256") and c.get("published_sha256") and c["sha256"] != c["published_sha256"]]


def unhashed_reasons(checksums: list[dict]) -> list[str]:
    """Files whose checksum was never computed: a rerun resumed them where a killed run stopped, without reading
    their first bytes again. Not a mismatch (no --partial needed), but not verified either: said as it is."""
    return [f"{c['file']}: checksum not computed (a rerun resumed it at byte {c.get('resumed_at'):,}); checked instead: "
            "the per-class counts, every image's header, and that each image the rerun read decodes" for c in checksums
            if c.get("one_pass") is False]


def reason(record: dict) -> str | None:
    """Why a parsed prepared.json or warmstart.json says its data is unverified (one short line), or None when
    verified. prepare writes "verified" and "unverified_reasons" together; a prepared.json from before it did is
    judged by the checksums it lists."""
    if "verified" not in record:
        return "; ".join(unverified_reasons(record.get("checksums") or [])) or None
    if record["verified"]:
        return None
    return "; ".join(map(str, record.get("unverified_reasons") or [])) or "not verified"


def folder_reason(root: Path) -> str | None:
    """`reason` for the dataset folder at `root` (or None when prepare did not make it). `root` may also be a shortN
    copy whose prepared.json lives only in the parent."""
    root = Path(root)
    path = root / "prepared.json"
    if not path.is_file() and re.fullmatch(r"short\d+", root.name):
        path = root.parent / "prepared.json"
    if not path.is_file():
        return None
    try:
        return reason(untrusted.read_json(path, "prepared.json"))
    except UserError as e:  # bounded, typed, one line naming the file: the data counts as unverified, with why
        return f"unreadable: {e}"
    except (AttributeError, TypeError, KeyError):  # fields of other types than prepare writes
        return f"{path} is unreadable or not written by warmstart prepare"


def folder_warning(root: Path) -> str | None:
    """One line when `warmstart prepare` marked the dataset unverified (checksum mismatch accepted by --partial)."""
    why = folder_reason(root)
    return f"warning: training on unverified data ({why}); see {root}/prepared.json" if why else None


def shards_warning(url: str, doc: dict, meta: str) -> str | None:
    """The same line for shards, from their warmstart.json (`doc`, read from url/meta)."""
    why = reason(doc)
    return f"warning: training on unverified shards ({why}); see {url}/{meta}" if why else None
