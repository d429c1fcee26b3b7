"""Download the head-to-head's 26 public-domain novels (benchmarks/books.tsv) and clean them (needs internet).

    python benchmarks/fetch_books.py                         # -> data/books/, the exact texts of docs/results.md
    python benchmarks/fetch_books.py --source gutenberg      # the same novels from Project Gutenberg
    python benchmarks/head_to_head.py --books data/books     # (data/books is also its default)

Sources:
* `tatom` (default): the British-fiction corpus of the TAToM tutorial (github.com/ariddell/tatom, compiled by
  Jan Rybicki from Project Gutenberg texts, licence boilerplate already removed) at a pinned commit. Each
  cleaned text must match the SHA-256 in books.tsv, so these are byte for byte the texts our numbers used.
* `gutenberg`: www.gutenberg.org by ebook number (a novel in volumes is joined in order). The Project
  Gutenberg header and licence footer are cut off, and the ebook's own "Title:" line must contain the expected
  title (a wrong number fails loudly). Editions differ from the tatom ones, so BPB is close, not identical.

Cleaning (both): decode UTF-8, CRLF/CR -> LF, drop blank lines at both ends, end with exactly one newline.
Writes OUT/<slug>.txt and OUT/books.tsv (file, split, title, author, year, source); files already present and
correct are kept. Project Gutenberg texts are free of copyright restrictions in the US; see www.gutenberg.org
for its terms of use (this script fetches each ebook once, with a pause between requests).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from _books import BOOK_LIST, DEFAULT_LOCATIONS, BookInfo, read_book_list
from tqdm import tqdm

TATOM_REPO = "ariddell/tatom"
TATOM_COMMIT = "28f5d57d9ff9bb132cad203f0743d9ddfe31c5ae"
TATOM_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"
USER_AGENT = "megalodon-lm fetch_books.py (one download per book)"
GUTENBERG_PAUSE_S = 2.0

_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.IGNORECASE | re.MULTILINE)
# Older ebooks also close with a plain "End of the Project Gutenberg EBook of ..." line before the marker.
_END_LINE = re.compile(r"^End of (?:the )?Project Gutenberg'?s? .*$", re.IGNORECASE | re.MULTILINE)
_TITLE = re.compile(r"^Title:[ \t]*(.+)$", re.MULTILINE)


class FetchError(RuntimeError):
    """A download or a check failed; the message names the book and the reason."""


def clean_text(raw: bytes) -> str:
    """UTF-8 text with LF line ends, no blank lines at either end, and exactly one final newline."""
    text = raw.decode("utf-8-sig")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    last = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].strip()), -1)
    return "\n".join(lines[first:last + 1]) + "\n"


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def gutenberg_title(raw: str) -> str | None:
    """The "Title:" field of a Project Gutenberg header, or None."""
    match = _TITLE.search(raw[: 20_000])
    return match.group(1).strip() if match else None


def strip_gutenberg(raw: str) -> str:
    """The body of a Project Gutenberg plain-text ebook: between its START and END markers."""
    start, end = _START.search(raw), _END.search(raw)
    if start is None or end is None or end.start() < start.end():
        raise ValueError("no '*** START OF ... PROJECT GUTENBERG EBOOK' / '*** END OF ...' markers")
    body = raw[start.end():end.start()]
    tail = _END_LINE.search(body)
    return body[: tail.start()] if tail else body


def http_get(url: str, timeout: float = 60.0) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _get(get: Callable[[str], bytes], url: str, book: BookInfo) -> bytes:
    try:
        return get(url)
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{book.slug}: downloading {url} failed ({exc})") from exc


def fetch_tatom(book: BookInfo, get: Callable[[str], bytes] = http_get) -> str:
    """The cleaned tatom text of `book`, checked against its SHA-256."""
    url = TATOM_URL.format(repo=TATOM_REPO, commit=TATOM_COMMIT, path=book.tatom_path)
    text = clean_text(_get(get, url, book))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != book.text_sha256:
        raise FetchError(f"{book.slug}: the text from {url} has SHA-256 {digest}, books.tsv expects "
                         f"{book.text_sha256}")
    return text


def fetch_gutenberg(book: BookInfo, get: Callable[[str], bytes] = http_get, pause_s: float = 0.0) -> str:
    """The cleaned Project Gutenberg text of `book` (its volumes joined by a blank line)."""
    parts = []
    for i, number in enumerate(book.gutenberg_ids):
        if i:
            time.sleep(pause_s)
        url = GUTENBERG_URL.format(id=number)
        raw = _get(get, url, book).decode("utf-8-sig", errors="replace")
        title = gutenberg_title(raw)
        if title is None or _normalized(book.gutenberg_title) not in _normalized(title):
            raise FetchError(f"{book.slug}: ebook {number} is titled {title!r}, expected one containing "
                             f"{book.gutenberg_title!r} (is the number in {BOOK_LIST.name} right?)")
        try:
            parts.append(clean_text(strip_gutenberg(raw).encode("utf-8")))
        except ValueError as exc:
            raise FetchError(f"{book.slug}: ebook {number}: {exc}") from exc
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def _is_current(path: Path, book: BookInfo, source: str) -> bool:
    if not path.is_file():
        return False
    if source == "tatom":
        return hashlib.sha256(path.read_bytes()).hexdigest() == book.text_sha256
    return path.stat().st_size > 0


def fetch_books(out: Path, source: str = "tatom", splits: tuple[str, ...] = ("train", "validation"),
                force: bool = False, get: Callable[[str], bytes] = http_get, progress: bool = True,
                pause_s: float = GUTENBERG_PAUSE_S) -> list[Path]:
    """Download, clean and write the books of `splits` into `out` with a books.tsv; returns the book files."""
    books = [b for b in read_book_list() if b.split in splits]
    out.mkdir(parents=True, exist_ok=True)
    paths, downloaded = [], 0
    for book in tqdm(books, desc=f"books from {source}", unit="book", disable=not progress):
        path = out / f"{book.slug}.txt"
        if force or not _is_current(path, book, source):
            if source == "gutenberg" and downloaded:
                time.sleep(pause_s)
            text = fetch_tatom(book, get) if source == "tatom" else fetch_gutenberg(book, get, pause_s)
            _write_atomic(path, text)
            downloaded += 1
        paths.append(path)
    with (out / "books.tsv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["file", "split", "title", "author", "year", "source"])
        for book, path in zip(books, paths, strict=True):
            where = (f"{TATOM_REPO}@{TATOM_COMMIT[:7]}:{book.tatom_path}" if source == "tatom" else
                     "gutenberg:" + "+".join(str(i) for i in book.gutenberg_ids))
            writer.writerow([path.name, book.split, book.title, book.author, book.year, where])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_LOCATIONS[0], help="output directory")
    p.add_argument("--source", choices=("tatom", "gutenberg"), default="tatom",
                   help="tatom: the exact texts of our results (checksummed); gutenberg: www.gutenberg.org")
    p.add_argument("--split", choices=("all", "train", "validation"), default="all", help="which books")
    p.add_argument("--force", action="store_true", help="download again even when a correct file exists")
    args = p.parse_args(argv)
    splits = ("train", "validation") if args.split == "all" else (args.split,)
    try:
        paths = fetch_books(args.out, args.source, splits, force=args.force)
    except FetchError as exc:
        print(f"fetch_books: error: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} books ({size / 1e6:.1f} MB) in {args.out}; use: "
          f"python benchmarks/head_to_head.py --books {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
