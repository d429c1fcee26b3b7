"""The head-to-head's books: the committed list, fetch_books.py's cleaning and checks (offline), folder splits."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import fetch_books  # noqa: E402
from _books import BookInfo, book_split, read_book, read_book_list  # noqa: E402
from fetch_books import FetchError, clean_text, fetch_gutenberg, gutenberg_title, strip_gutenberg  # noqa: E402

VALIDATION = {"austen-emma", "bronte-emily-wuthering-heights", "dickens-bleak-house", "eliot-middlemarch",
              "thackeray-vanity-fair", "trollope-the-prime-minister"}


def _pg(title: str, body: str, crlf: bool = True) -> bytes:
    """A small Project Gutenberg-style ebook: header, markers, an old-style closing line, licence footer."""
    text = (f"\ufeffThe Project Gutenberg eBook of {title}\n\nTitle: {title}\n\nAuthor: Someone\n\n"
            f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n{body}\n\n"
            f"End of the Project Gutenberg EBook of {title}, by Someone\n\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\nSection 1. General Terms of Use\n")
    return (text.replace("\n", "\r\n") if crlf else text).encode("utf-8")


def _book(slug: str, split: str, text: str, ids: tuple[int, ...] = (1,), title: str = "A Tale") -> BookInfo:
    return BookInfo(slug=slug, split=split, title=title, author="Someone", year="1800", gutenberg_ids=ids,
                    gutenberg_title=title, text_bytes=len(text.encode()),
                    text_sha256=hashlib.sha256(text.encode()).hexdigest(), tatom_path=f"data/{slug}.txt")


def test_committed_book_list():
    books = read_book_list()
    assert len(books) == 26 and len({b.slug for b in books}) == 26
    assert {b.slug for b in books if b.split == "validation"} == VALIDATION
    assert {b.split for b in books} == {"train", "validation"}
    for b in books:
        assert len(b.text_sha256) == 64 and int(b.text_sha256, 16) >= 0, b.slug
        assert b.gutenberg_ids and all(i > 0 for i in b.gutenberg_ids) and b.gutenberg_title, b.slug
        assert b.text_bytes > 200_000, b.slug
    assert sum(b.text_bytes for b in books if b.split == "validation") == 8_443_591


def test_clean_text_line_ends_blank_edges_and_final_newline():
    raw = "\ufeff\r\n  \r\n\nChapter I\r\nIt was\rdark.\r\n\r\nEnd.   \n \n\n".encode()
    assert clean_text(raw) == "Chapter I\nIt was\ndark.\n\nEnd.   \n"
    assert clean_text(b"one line") == "one line\n"
    assert clean_text("caf\u00e9 \u00a3\r\n".encode()) == "caf\u00e9 \u00a3\n"


def test_strip_gutenberg_keeps_only_the_body():
    raw = _pg("A Tale", "CHAPTER I\n\nIt began.\n\nTHE END").decode("utf-8-sig")
    assert gutenberg_title(raw) == "A Tale"
    body = clean_text(strip_gutenberg(raw).encode())
    assert body == "CHAPTER I\n\nIt began.\n\nTHE END\n"
    with pytest.raises(ValueError, match="START OF"):
        strip_gutenberg("no markers here")


def test_fetch_gutenberg_joins_volumes_and_checks_titles():
    pages = {fetch_books.GUTENBERG_URL.format(id=7): _pg("A Tale, Vol. 1", "Volume one."),
             fetch_books.GUTENBERG_URL.format(id=8): _pg("A Tale, Vol. 2", "Volume two.", crlf=False)}
    book = _book("a-tale", "train", "", ids=(7, 8))
    assert fetch_gutenberg(book, pages.__getitem__) == "Volume one.\n\nVolume two.\n"
    wrong = _book("a-tale", "train", "", ids=(7,), title="Another Story")
    with pytest.raises(FetchError, match="ebook 7 is titled 'A Tale, Vol. 1'"):
        fetch_gutenberg(wrong, pages.__getitem__)


def test_fetch_books_tatom_offline(tmp_path, monkeypatch):
    """Checksums pass and fail, existing correct files are kept, and the output folder splits as listed."""
    texts = {"book-a": "A first novel.\n", "book-b": "A second novel.\n\nWith two paragraphs.\n"}
    books = [_book("book-a", "train", texts["book-a"]), _book("book-b", "validation", texts["book-b"])]
    monkeypatch.setattr(fetch_books, "read_book_list", lambda: books)
    calls: list[str] = []

    def get(url: str) -> bytes:
        calls.append(url)
        slug = url.rsplit("/", 1)[1].removesuffix(".txt")
        return ("\r\n" + texts[slug].replace("\n", "\r\n") + "\r\n\r\n").encode()

    out = tmp_path / "books"
    paths = fetch_books.fetch_books(out, "tatom", get=get, progress=False)
    assert [p.read_text() for p in paths] == [texts["book-a"], texts["book-b"]]
    assert all(fetch_books.TATOM_COMMIT in url for url in calls) and len(calls) == 2
    split = book_split(out)
    assert [p.name for p in split["train"]] == ["book-a.txt"]
    assert [p.name for p in split["validation"]] == ["book-b.txt"]
    fetch_books.fetch_books(out, "tatom", get=get, progress=False)
    assert len(calls) == 2  # both files already correct: nothing downloaded again

    texts["book-a"] = "A different edition.\n"
    with pytest.raises(FetchError, match="book-a: the text from .* has SHA-256"):
        fetch_books.fetch_books(tmp_path / "other", "tatom", get=get, progress=False)


def test_book_split_of_a_folder_of_txt_files(tmp_path):
    for i in range(6):
        (tmp_path / f"novel-{i}.txt").write_text(f"text {i}\n")
    (tmp_path / "austen-emma.txt").write_text("Emma\n")  # a listed slug keeps the list's split
    (tmp_path / "notes.md").write_text("ignored\n")
    split = book_split(tmp_path)
    assert [p.name for p in split["validation"]] == ["austen-emma.txt", "novel-4.txt"]
    assert [p.name for p in split["train"]] == [f"novel-{i}.txt" for i in (0, 1, 2, 3, 5)]
    assert read_book(split["train"][0]) == b"text 0\n" and read_book(split["train"][0], 4) == b"text"


def test_book_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        book_split(tmp_path / "missing")
    (tmp_path / "only.txt").write_text("x\n")
    with pytest.raises(ValueError, match="1 training and 0 validation"):
        book_split(tmp_path)


def test_head_to_head_without_books_is_a_one_line_error(tmp_path, capsys):
    import head_to_head

    assert head_to_head.main(["--books", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "books directory not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
