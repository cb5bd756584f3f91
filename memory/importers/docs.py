"""`ouro import docs`: the owner's own writing (text, Markdown, HTML, PDF) as redacted chunks.

These are not chats: nobody replies, so they are not training windows. A cycle reads them in a
short continued-pretraining pass before SFT (trainer/pretrain.py): the persona learns what the
owner knows and how they write, with the loss on every token.

- Formats, by the file's suffix: .txt and .md/.markdown as written (Markdown is plain text a
  model reads well); .html/.htm through the standard library's HTML parser, keeping the visible
  text (not scripts, styles or the head) with paragraph breaks at block elements; .pdf through
  pypdf, page by page. Text files must be UTF-8: a file that is not (or holds NUL bytes, a binary
  file renamed) is an error naming it, as is a PDF pypdf cannot read or an encrypted one.
- A folder is read recursively; files of other kinds are listed as skipped. All of it lands in
  one transaction, or nothing does: one bad file stores nothing and names the file.
- Personal data is redacted (memory.redact) before anything is stored.
- Chunks of at most `chunk_chars` characters, cut at paragraph breaks (a paragraph longer than
  that at a sentence end or a space): pieces of a size the trainer packs into rows.
- Bounded: one file at most MAX_DOC_BYTES, one import at most MAX_IMPORT_CHARS characters of
  text; files are read one at a time and only their redacted chunks are kept until the write.
- Idempotent: a document whose bytes were imported before adds nothing; a chunk already stored
  (the same passage in two documents) is stored once.
"""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

from core.errors import OuroError
from memory.importers.limits import read_file
from memory.redact import redact
from memory.store import Store

FORMATS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
           ".pdf": "pdf"}
CHUNK_CHARS = 2000
MAX_DOC_BYTES = 64 << 20
MAX_IMPORT_CHARS = 64 << 20
HINT = "documents are .txt, .md, .html or .pdf files; text files must be UTF-8"
PLACEHOLDERS = ("[email]", "[phone]", "[card]", "[iban]", "[account]", "[address]", "[url]", "[secret]")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def import_docs(store: Store, path: Path | str, *, chunk_chars: int = CHUNK_CHARS) -> dict:
    """Read `path` (a file or a folder), store its documents' redacted chunks; return the summary."""
    path = Path(path)
    files, skipped = find_files(path)
    documents, total_chars = [], 0
    for file in files:
        doc = read_document(file, chunk_chars=chunk_chars)
        total_chars += doc["chars"]
        if total_chars > MAX_IMPORT_CHARS:
            raise OuroError(f"{path}: more than {MAX_IMPORT_CHARS >> 20} M characters of text in one import "
                            f"(reached at {file})", hint="import the folder's parts one by one")
        documents.append(doc)
    stored = store.add_documents(documents)
    per_file = [{"file": str(d["file"]), "format": d["format"], "chars": d["chars"], "chunks": len(d["chunks"]),
                 "new_chunks": new, "redactions": d["redactions"]}
                for d, new in zip(documents, stored.pop("per_document"), strict=True)]
    return {"kind": "docs", "path": str(path), "files": per_file, "skipped_files": [str(s) for s in skipped],
            "chunks": sum(len(d["chunks"]) for d in documents), **stored,
            "redactions": sum(d["redactions"] for d in documents),
            "tokens_estimate": sum(len(_TOKEN.findall(c["text"])) for d in documents for c in d["chunks"]),
            "chunk_chars": chunk_chars}


def find_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(the documents to read, the other files of a folder), sorted by path."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in found if p.suffix.lower() in FORMATS]
        if not files:
            raise OuroError(f"{path}: no documents in this folder ({len(found)} other files)", hint=HINT)
        return files, [p for p in found if p.suffix.lower() not in FORMATS]
    if not path.exists():
        raise OuroError(f"{path}: no such file or folder")
    if path.suffix.lower() not in FORMATS:
        raise OuroError(f"{path}: not a document this importer reads ({path.suffix or 'no suffix'})", hint=HINT)
    return [path], []


def read_document(file: Path, *, chunk_chars: int = CHUNK_CHARS) -> dict:
    """One file → {file, format, sha256, chars, redactions, chunks: [{text, sha256}]}; OuroError naming it."""
    fmt = FORMATS[file.suffix.lower()]
    try:
        data = bytes(read_file(file, hint=HINT, lines=False)) if file.stat().st_size <= MAX_DOC_BYTES else None
    except OSError as exc:
        raise OuroError(f"{file}: cannot read it: {exc.strerror}") from exc
    if data is None:
        raise OuroError(f"{file}: larger than {MAX_DOC_BYTES >> 20} MiB, more than one document holds", hint=HINT)
    text = pdf_text(file, data) if fmt == "pdf" else decode(file, data)
    if fmt == "html":
        text = html_text(text)
    text = normalize(text)
    clean = redact(text)
    redactions = sum(clean.count(p) - text.count(p) for p in PLACEHOLDERS)
    chunks = [{"text": c, "sha256": hashlib.sha256(c.encode("utf-8")).hexdigest()}
              for c in chunk(clean, chunk_chars)]
    return {"file": str(file.resolve()), "format": fmt, "sha256": hashlib.sha256(data).hexdigest(), "chars": len(text),
            "redactions": redactions, "chunks": chunks}


def decode(file: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OuroError(f"{file}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})",
                        hint="save it as UTF-8 and import it again") from exc
    if "\0" in text:
        raise OuroError(f"{file}: holds NUL bytes: a binary file, not text", hint=HINT)
    return text


class _Visible(HTMLParser):
    """The text a browser shows, with a paragraph break at each block element."""

    HIDDEN = {"script", "style", "head", "title", "noscript", "template", "svg"}
    BLOCKS = {"p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "li", "ul", "ol",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "tr", "hr", "dl", "dt", "dd",
              "figure", "figcaption", "form"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data) -> None:
        if not self.hidden:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_text(html: str) -> str:
    parser = _Visible()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def pdf_text(file: Path, data: bytes) -> str:
    """Every page's text (pypdf), pages separated by a paragraph break."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise OuroError(f"{file}: the PDF is encrypted", hint="save an unencrypted copy and import that")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except OuroError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise OuroError(f"{file}: not a readable PDF ({type(exc).__name__}: {str(exc)[:120]})", hint=HINT) from exc


def normalize(text: str) -> str:
    """Unix line ends, no trailing spaces, no runs of more than one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def chunk(text: str, size: int) -> list[str]:
    """Pieces of at most `size` characters: whole paragraphs where they fit, else cut at a sentence end
    or a space (a run of `size` characters without one is cut where it ends)."""
    out: list[str] = []
    current = ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        pieces = [para] if len(para) <= size else _split_long(para, size)
        for piece in pieces:
            if current and len(current) + 2 + len(piece) <= size:
                current += "\n\n" + piece
            else:
                if current:
                    out.append(current)
                current = piece
    if current:
        out.append(current)
    return out


def _split_long(para: str, size: int) -> list[str]:
    pieces = []
    while len(para) > size:
        window = para[:size]
        cut = max(window.rfind(". "), window.rfind("! "), window.rfind("? "), window.rfind("\n"))
        cut = cut + 1 if cut >= size // 2 else window.rfind(" ")
        if cut <= 0:
            cut = size
        pieces.append(para[:cut].strip())
        para = para[cut:].strip()
    if para:
        pieces.append(para)
    return pieces


def format_summary(s: dict) -> str:
    """The summary for a person; `--json` prints the dict itself."""
    lines = [f"imported documents from {s['path']}"]
    for f in s["files"]:
        lines.append(f"  {f['file']}  {f['format']}, {f['chars']} characters, {_n(f['chunks'], 'chunk')} "
                     f"({f['new_chunks']} new)")
    if s["skipped_files"]:
        lines.append(f"  skipped    {_n(len(s['skipped_files']), 'file')} of other kinds: "
                     + ", ".join(Path(p).name for p in s["skipped_files"][:5])
                     + (" …" if len(s["skipped_files"]) > 5 else ""))
    lines += [f"  stored     {_n(s['new_chunks'], 'new chunk')}, {s['already_present']} already there "
              f"({_n(s['known_documents'], 'document')} imported before)",
              f"  redacted   {s['redactions']} personal details replaced by placeholders",
              f"  tokens     ~{s['tokens_estimate']} (estimated: words and symbols, not the model's tokenizer)"]
    if s["new_chunks"]:
        lines.append("next: the next cycle (`ouro cycle`) reads them in a short continued-pretraining pass before SFT; "
                     "a cycle still needs reviewed chat examples to run")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
