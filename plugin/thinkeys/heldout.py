"""Held-out English of other kinds than Wikipedia, for scoring only: nothing in conversion or recovery reads it.

Both come from Debian packages (fetched with ``apt-get download`` and unpacked with ``dpkg-deb``;
no installation, no root needed once the package lists are there):

``kjv.txt``
    the King James Bible (``sword-text-kjv``, public domain): early-modern English narrative. The
    SWORD zText module is read directly (zlib blocks of OSIS markup, tags removed); the file starts
    at the Book of Acts, narrative prose (the New Testament's first pages are genealogies).
``fortunes.txt``
    quotations, aphorisms and jokes (``fortunes`` and ``fortunes-min``, BSD/public domain mix): short, conversational
    English; one fortune per block, taken round-robin from the collections in :data:`FORTUNE_FILES`.

``thinkeys fetch --heldout`` writes them to ``data/heldout/`` with a manifest (package versions and
sha256s), atomically.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from thinkeys.checkpoint import ThinKeyError
from thinkeys.data import sha256_file

PACKAGES = ("sword-text-kjv", "fortunes", "fortunes-min")
KJV_MODULE = "usr/share/sword/modules/texts/ztext/engKJV2006eb"
KJV_START = "The former treatise have I made"  # Acts 1:1
FORTUNE_DIR = "usr/share/games/fortunes"
FORTUNE_FILES = ("literature", "wisdom", "people", "humorists", "science", "education", "work", "politics")


def _download(packages: tuple[str, ...], into: Path) -> dict[str, str]:
    """Download and unpack ``packages`` into ``into``; return their versions."""
    try:
        subprocess.run(["apt-get", "download", *packages], cwd=into, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ThinKeyError("apt-get not found: the held-out texts come from Debian packages (sword-text-kjv, fortunes)") from None
    except subprocess.CalledProcessError as exc:
        raise ThinKeyError(f"apt-get download {' '.join(packages)} failed ({exc.stderr.strip().splitlines()[-1:]}); "
                           "run `apt-get update` (as root) first") from None
    versions = {}
    for deb in sorted(into.glob("*.deb")):
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into / "root")], check=True)
    return versions


def read_ztext(module: Path, testament: str = "nt") -> str:
    """All verses of a SWORD zText testament as plain text (OSIS tags removed)."""
    index = (module / f"{testament}.bzs").read_bytes()
    blob = (module / f"{testament}.bzz").read_bytes()
    parts = []
    for i in range(len(index) // 12):
        offset, size, _ = struct.unpack_from("<III", index, i * 12)
        if size:
            parts.append(zlib.decompress(blob[offset:offset + size]).decode("utf-8", "replace"))
    text = re.sub(r"<[^>]*>", " ", "".join(parts))
    text = re.sub(r"\s+", " ", text)
    return re.sub(r" ([,.;:?!)])", r"\1", text).replace("( ", "(").strip()


def kjv_text(root: Path) -> str:
    text = read_ztext(root / KJV_MODULE)
    start = text.find(KJV_START)
    if start < 0:
        raise ThinKeyError(f"{KJV_MODULE}: Acts 1:1 not found; the sword-text-kjv package changed")
    # one paragraph per ~12 sentences keeps the file readable; the evaluator only reads tokens
    sentences = re.split(r"(?<=[.;:?!]) ", text[start:])
    return "\n\n".join(" ".join(sentences[i:i + 12]) for i in range(0, len(sentences), 12)) + "\n"


def fortunes_text(root: Path) -> str:
    collections = []
    for name in FORTUNE_FILES:
        path = root / FORTUNE_DIR / name
        if not path.is_file():
            raise ThinKeyError(f"{FORTUNE_DIR}/{name} missing from the fortunes package")
        items = [f.strip() for f in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        collections.append([f for f in items if f and f != "%"])
    out = []
    for i in range(max(len(c) for c in collections)):  # round-robin over the collections
        out.extend(c[i] for c in collections if i < len(c))
    return "\n\n".join(out) + "\n"


def fetch_heldout(dest: str | Path, *, force: bool = False) -> dict:
    dest = Path(dest)
    if (dest / "manifest.json").is_file() and not force:
        return json.loads((dest / "manifest.json").read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".heldout-") as work:
        work = Path(work)
        versions = _download(PACKAGES, work)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            (tmp / "kjv.txt").write_text(kjv_text(work / "root"), encoding="utf-8")
            (tmp / "fortunes.txt").write_text(fortunes_text(work / "root"), encoding="utf-8")
            manifest = {
                "purpose": "held-out scoring only; never calibration or recovery text",
                "packages": versions,
                "splits": {name: {"file": f"{name}.txt", "sha256": sha256_file(tmp / f"{name}.txt")} for name in ("kjv", "fortunes")},
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest
