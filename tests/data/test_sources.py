"""Sources: resolving files/directories/globs, reading documents (plain, .jsonl, compressed), default corpus."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest

from megalodon_lm.data import Document, default_corpus, is_validation_path, iter_documents, resolve_sources
from megalodon_lm.data.sources import stdlib_root


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ------------------------------------------------------------------------------------------------ resolve
def test_resolve_files_directories_and_globs(tmp_path: Path):
    a = write(tmp_path / "a.txt", "aaa")
    b = write(tmp_path / "d" / "sub" / "b.md", "bbb")
    c = write(tmp_path / "d" / "c.jsonl.gz", gzip.compress(b'{"text": "c"}\n'))
    write(tmp_path / "d" / "image.png", b"\x89PNG")  # not a text suffix: skipped by the directory scan
    write(tmp_path / "d" / ".hidden.txt", "h")
    write(tmp_path / "d" / ".git" / "x.txt", "h")
    odd = write(tmp_path / "notes.data", "explicit files are taken whatever their suffix")

    assert resolve_sources([a]) == [a.resolve()]
    assert resolve_sources([tmp_path / "d"]) == sorted([b.resolve(), c.resolve()])
    assert resolve_sources([str(tmp_path / "*.txt")]) == [a.resolve()]
    assert resolve_sources([str(tmp_path / "d" / "**" / "*.md")]) == [b.resolve()]
    # Overlapping entries are de-duplicated and the result is sorted.
    got = resolve_sources([b, tmp_path / "d", odd, a, str(tmp_path / "?.txt")])
    assert got == sorted({a.resolve(), b.resolve(), c.resolve(), odd.resolve()})


def test_resolve_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="data path not found: .*missing.txt"):
        resolve_sources([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="data path not found"):
        resolve_sources([str(tmp_path / "*.nothing")])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="data path not found"):
        resolve_sources([tmp_path / "emptydir"])
    write(tmp_path / "e1.txt", b"")
    write(tmp_path / "e2.txt.gz", gzip.compress(b""))
    with pytest.raises(ValueError, match="data is empty"):
        resolve_sources([tmp_path / "e1.txt", tmp_path / "e2.txt.gz"])
    write(tmp_path / "full.txt", "x")
    assert len(resolve_sources([tmp_path])) == 3  # empty files are fine next to a non-empty one


# ------------------------------------------------------------------------------------------------ documents
def test_plain_file_is_one_raw_document(tmp_path: Path):
    data = "line one\nline two ü\n".encode() + b"\xff\xfe"
    docs = list(iter_documents(write(tmp_path / "a.txt", data)))
    assert docs == [Document(text=data, source=str(tmp_path / "a.txt"), index=0)]
    assert list(iter_documents(write(tmp_path / "empty.txt", b""))) == []


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".xz", lzma.compress)])
def test_compressed_files(tmp_path: Path, suffix: str, compress):
    text = "compressed text ü\n" * 10
    (doc,) = iter_documents(write(tmp_path / f"a.txt{suffix}", compress(text.encode())))
    assert doc.text == text.encode()
    records = jsonl({"text": "one"}, {"prompt": "Q?", "response": "A."})
    docs = list(iter_documents(write(tmp_path / f"b.jsonl{suffix}", compress(records.encode()))))
    assert [(d.text, d.prompt) for d in docs] == [(b"one", None), (b"A.", b"Q?")]


def test_jsonl_text_and_prompt_response(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", jsonl({"text": "héllo", "id": 7}) + "\n  \n"
                 + jsonl({"prompt": "2+2=", "response": "4"}, {"text": "last"}))
    docs = list(iter_documents(path))
    assert [d.text for d in docs] == ["héllo".encode(), b"4", b"last"]
    assert [d.prompt for d in docs] == [None, b"2+2=", None]
    assert [d.index for d in docs] == [0, 3, 4]  # 0-based line numbers; blank lines skipped
    assert all(d.source == str(path) for d in docs)


@pytest.mark.parametrize("bad_line", ["{not json", json.dumps({"prompt": "only a prompt"}), json.dumps([1, 2]),
                                      json.dumps({"text": 5})])
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str):
    path = write(tmp_path / "bad.jsonl", jsonl({"text": "ok"}, {"text": "ok"}) + bad_line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        list(iter_documents(path))


# ------------------------------------------------------------------------------------------------ default corpus
def test_default_corpus_is_the_stdlib_without_tests():
    files = default_corpus()
    assert len(files) > 100
    assert files == sorted(files) and files == default_corpus()
    root = stdlib_root()
    for f in files:
        rel = f.relative_to(root)
        assert f.suffix == ".py" and f.stat().st_size >= 1024
        assert not {"site-packages", "test", "tests", "idle_test"} & set(rel.parts[:-1]), rel
    names = {f.relative_to(root).as_posix() for f in files}
    assert "os.py" in names and "json/decoder.py" in names


def test_validation_split_is_small_and_stable():
    files = default_corpus()
    picked = [f for f in files if is_validation_path(f)]
    assert 0.01 <= len(picked) / len(files) <= 0.04
    assert picked == [f for f in files if is_validation_path(f, 0.02)]
    assert not any(is_validation_path(f, 0.0) for f in files[:50])
    assert all(is_validation_path(f, 1.0) for f in files[:50])
    # Keyed by the path inside the stdlib, so the split is the same wherever Python is installed.
    assert is_validation_path(stdlib_root() / "os.py", 0.5) == is_validation_path(Path("os.py"), 0.5)
