"""`ouro import docs`: text, Markdown, HTML and PDF become redacted chunks; the same file twice stores
nothing new; a bad file stores nothing and is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.errors import OuroError
from memory.importers.docs import chunk, import_docs
from ouro.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "docs"


def chunks(store) -> list[str]:
    return [c["text"] for c in store.document_chunks()]


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF showing `lines` in Helvetica, written by hand (offsets and all)."""
    text = " T* ".join(f"({line})Tj" for line in lines)
    stream = f"BT /F1 12 Tf 14 TL 72 720 Td {text} ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_a_folder_of_documents_becomes_redacted_chunks(store):
    summary = import_docs(store, FIXTURES)
    assert [Path(f["file"]).name for f in summary["files"]] == ["garden-notes.md", "letter.txt", "recipe.html"]
    assert [Path(p).name for p in summary["skipped_files"]] == ["photo.jpg"]
    assert summary["new_documents"] == 3 and summary["new_chunks"] == summary["chunks"] == 3
    text = "\n".join(chunks(store))
    # redacted before storing: the e-mail, the phone number and the street address
    assert "marta.lind@example.org" not in text and "[email]" in text
    assert "7700 900123" not in text and "[phone]" in text
    assert "42 Willow Lane Road" not in text and "[address]" in text
    assert summary["redactions"] == 3
    # Markdown as written; HTML: the visible text only, entities decoded, blocks as paragraphs
    assert "# Notes from the allotment" in text and "blue tomatoes of plot 17" in text
    html = next(c for c in chunks(store) if "Nettle soup" in c)
    assert "Pick the top four leaves of young nettles in April & wear gloves." in html
    assert "Simmer with one potato\nand a spoon of butter" in html
    for hidden in ("Ignored title", "color: red", "never stored", "a comment nobody sees"):
        assert hidden not in html
    assert "nettles\n\npotato" in html


def test_importing_the_same_file_twice_stores_nothing_new(store, tmp_path):
    first = import_docs(store, FIXTURES / "letter.txt")
    assert first["new_chunks"] == 1
    again = import_docs(store, FIXTURES / "letter.txt")
    assert again["new_chunks"] == 0 and again["new_documents"] == 0 and again["known_documents"] == 1
    copy = tmp_path / "copy-of-letter.txt"                 # same passage under another name: stored once
    shutil.copy(FIXTURES / "letter.txt", copy)
    copy.write_text(copy.read_text() + "\n", encoding="utf-8")   # other bytes, same text once normalized
    assert import_docs(store, copy)["new_chunks"] == 0
    assert len(chunks(store)) == 1
    assert store.database.scalar("SELECT COUNT(*) FROM documents") == 2


@pytest.mark.parametrize("name,data,says", [
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8 text (byte 3 is 0xe9)"),
    ("binary.md", b"PK\x03\x04\x00\x00binary", "NUL bytes"),
    ("broken.pdf", b"%PDF-1.4\nthis is no pdf at all", "not a readable PDF"),
])
def test_a_bad_file_stores_nothing_and_is_named(store, tmp_path, name, data, says):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(FIXTURES / "letter.txt", folder / "a-good-one.txt")
    (folder / name).write_bytes(data)
    with pytest.raises(OuroError, match=str(folder / name)) as err:
        import_docs(store, folder)
    assert says in str(err.value)
    assert chunks(store) == [] and store.database.scalar("SELECT COUNT(*) FROM documents") == 0


def test_what_is_not_a_document_is_refused_by_name(store, tmp_path):
    with pytest.raises(OuroError, match="photo.jpg: not a document"):
        import_docs(store, FIXTURES / "photo.jpg")
    with pytest.raises(OuroError, match="no such file"):
        import_docs(store, tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OuroError, match="no documents in this folder"):
        import_docs(store, tmp_path / "empty")


def test_a_pdf_is_read_page_text(store, tmp_path):
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(minimal_pdf(["Plant garlic in October.", "Call me on 0161 496 0000 first."]))
    summary = import_docs(store, pdf)
    assert summary["files"][0]["format"] == "pdf" and summary["new_chunks"] == 1
    text = chunks(store)[0]
    assert "Plant garlic in October." in text and "[phone]" in text and "0161" not in text


def test_chunks_keep_paragraphs_whole_and_cut_long_ones_at_a_sentence():
    paras = ["one " * 10, "two " * 10, "three " * 10]
    text = "\n\n".join(p.strip() for p in paras)
    out = chunk(text, 100)
    assert all(len(c) <= 100 for c in out) and out[0].startswith("one") and "two" in out[0]
    assert out[-1].startswith("three")
    long = "A sentence here. " * 20
    pieces = chunk(long, 100)
    assert all(len(p) <= 100 for p in pieces) and all(p.endswith(".") for p in pieces)
    assert " ".join(pieces).split() == long.split()               # nothing lost


def test_the_cli_imports_docs_with_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OURO_DATA_DIR", str(tmp_path / "data"))
    assert main(["import", "docs", str(FIXTURES / "letter.txt"), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["kind"] == "docs" and first["new_chunks"] == 1
    assert main(["import", "docs", str(FIXTURES / "letter.txt")]) == 0
    assert "0 new chunks, 1 already there (1 document imported before)" in capsys.readouterr().out
    assert main(["import", "docs", str(FIXTURES), "--me", "Ann"]) != 0
    assert "--me is not used for a docs import" in capsys.readouterr().err
