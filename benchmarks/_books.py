"""The head-to-head's books: the committed list (books.tsv), the train/validation split of a folder, reading.

`benchmarks/books.tsv` names the 26 public-domain English novels (1740-1876) of our "mini-PG19" corpus with
their fixed split, Project Gutenberg ebook numbers, and the SHA-256 of the exact text our results were measured
on. `benchmarks/fetch_books.py` downloads them; `head_to_head.py --books DIR` then reads any folder of books:

* a folder with its own `books.tsv` (columns `file` and `split`, as fetch_books.py writes) uses that split;
* otherwise each `.txt` / `.txt.gz` / `.txt.xz` file whose name is a slug of the list keeps the list's split,
  and the other files are split deterministically: sorted by name, every fifth goes to validation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from megalodon_lm.data.sources import open_binary

BOOK_LIST = Path(__file__).with_name("books.tsv")
BOOK_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
SPLITS = ("train", "validation")
REPO = Path(__file__).resolve().parents[1]
# Where fetch_books.py writes by default, then an optional shared data folder beside the repository.
DEFAULT_LOCATIONS = (REPO / "data" / "books", REPO.parent / "shared" / "data" / "books")


@dataclass(frozen=True)
class BookInfo:
    """One row of books.tsv."""

    slug: str
    split: str
    title: str
    author: str
    year: str
    gutenberg_ids: tuple[int, ...]  # several for a novel Project Gutenberg publishes in volumes, in order
    gutenberg_title: str  # a phrase the ebook's "Title:" header must contain (checks the number)
    text_bytes: int
    text_sha256: str  # of the cleaned text of the pinned source (fetch_books.py --source tatom)
    tatom_path: str


def read_book_list(path: Path = BOOK_LIST) -> list[BookInfo]:
    """The committed book list, validation books first."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [BookInfo(slug=r["slug"], split=r["split"], title=r["title"], author=r["author"], year=r["year"],
                     gutenberg_ids=tuple(int(i) for i in r["gutenberg_ids"].split("+")),
                     gutenberg_title=r["gutenberg_title"], text_bytes=int(r["text_bytes"]),
                     text_sha256=r["text_sha256"], tatom_path=r["tatom_path"]) for r in rows]


def default_books_dir() -> Path | None:
    """The first existing default location, or None."""
    return next((d for d in DEFAULT_LOCATIONS if d.is_dir()), None)


def book_slug(path: Path) -> str:
    """'austen-emma.txt.xz' -> 'austen-emma'."""
    name = Path(path).name
    for suffix in sorted(BOOK_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _from_tsv(books_dir: Path, tsv: Path) -> dict[str, list[Path]]:
    split: dict[str, list[Path]] = {s: [] for s in SPLITS}
    with tsv.open(encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.DictReader(fh, delimiter="\t"), 2):
            if row.get("split") not in SPLITS or not row.get("file"):
                raise ValueError(f"{tsv}, line {number}: needs a `file` and a `split` of train or validation")
            path = books_dir / row["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{tsv}, line {number}: {path} not found")
            split[row["split"]].append(path)
    return split


def book_split(books_dir: Path) -> dict[str, list[Path]]:
    """{"train": [...], "validation": [...]} (each sorted by file name) for a folder of books (module doc)."""
    books_dir = Path(books_dir)
    if not books_dir.is_dir():
        raise FileNotFoundError(f"books directory not found: {books_dir}")
    tsv = books_dir / "books.tsv"
    if tsv.is_file():
        split = _from_tsv(books_dir, tsv)
    else:
        files = sorted(p for p in books_dir.iterdir() if p.is_file() and p.name.endswith(BOOK_SUFFIXES))
        listed = {b.slug: b.split for b in read_book_list()}
        split = {s: [p for p in files if listed.get(book_slug(p)) == s] for s in SPLITS}
        others = [p for p in files if book_slug(p) not in listed]
        split["validation"] += others[4::5]
        split["train"] += [p for i, p in enumerate(others) if i % 5 != 4]
    if not split["train"] or not split["validation"]:
        raise ValueError(f"{books_dir}: {len(split['train'])} training and {len(split['validation'])} validation "
                         f"books; both are needed (a folder of .txt files needs at least 5: every fifth validates)")
    return {k: sorted(v) for k, v in split.items()}


def read_book(path: Path, n_bytes: int | None = None) -> bytes:
    """A book's bytes (its first n_bytes), decompressing .gz / .xz."""
    with open_binary(Path(path)) as fh:
        return fh.read() if n_bytes is None else fh.read(n_bytes)
