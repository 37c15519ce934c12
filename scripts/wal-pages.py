#!/usr/bin/env python3
"""Which B-trees a SQLite WAL's commits wrote, in pages per commit.

    python3 scripts/wal-pages.py COPY.db COPY.db-wal [MORE.db-wal ...]

Reads the valid frames of the WAL (those carrying the salts of its header,
up to the last commit frame), groups them by commit, and names each frame's
page by the table or index that owns it (SQLite's `dbstat` over the database
copy, opened read-only without its WAL). Copy the WAL first and the database
after, while the server runs: a page the copy's trees no longer own shows as
"(freed or new)". Several WAL copies (taken one after another from the same
server, the database copied after the last) are counted together.

Used to see what the writer pays for per event (docs/performance.md): the
pages per commit of each tree, divided by the requests per transaction the
load harness prints, are the pages each tree costs a request.
"""
import collections
import shutil
import sqlite3
import struct
import sys
import tempfile
from pathlib import Path


def frames(wal: bytes):
    """(pgno, commit_size) of each valid frame, in order."""
    if len(wal) < 32:
        sys.exit("too short for a WAL header")
    magic, _version, page_size, _seq, salt1, salt2 = struct.unpack(">IIIIII", wal[:24])
    if magic not in (0x377F0682, 0x377F0683):
        sys.exit("not a WAL file")
    at = 32
    out = []
    while at + 24 + page_size <= len(wal):
        pgno, commit, s1, s2 = struct.unpack(">IIII", wal[at : at + 16])
        if (s1, s2) != (salt1, salt2) or pgno == 0:
            break
        out.append((pgno, commit))
        at += 24 + page_size
    # Frames after the last commit frame belong to no commit.
    last = max((i for i, (_, c) in enumerate(out) if c), default=-1)
    return out[: last + 1], page_size


def owners(db: Path):
    """pgno -> name of the table or index owning it."""
    with tempfile.TemporaryDirectory() as d:
        # A copy of its own, so SQLite finds no WAL next to it.
        alone = Path(d) / "alone.db"
        shutil.copyfile(db, alone)
        con = sqlite3.connect(f"file:{alone}?mode=ro", uri=True)
        return dict((p, n) for n, p in con.execute("SELECT name, pageno FROM dbstat"))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    db = Path(sys.argv[1])
    found = []
    for wal in sys.argv[2:]:
        some, page_size = frames(Path(wal).read_bytes())
        found += some
    commits = sum(1 for _, c in found if c)
    if not commits:
        sys.exit("no complete commit in the WAL")
    names = owners(db)
    per_tree = collections.Counter(names.get(p, "(freed or new)") for p, _ in found)
    print(f"{len(found)} frames of {page_size} bytes in {commits} commits: "
          f"{len(found) / commits:.1f} pages per commit")
    print(f"{'tree':<36} {'pages/commit':>12} {'share':>7}")
    for name, n in per_tree.most_common():
        print(f"{name:<36} {n / commits:>12.2f} {100 * n / len(found):>6.1f}%")


if __name__ == "__main__":
    main()
