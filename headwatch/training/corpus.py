"""Build the offline training corpus from text that Debian packages install.

Usage:
    docs = build_corpus()                      # every source, or
    docs = build_corpus(["kjv", "jargon"])     # the public-domain part only

Sources and licences (recorded in headwatch/model/MODEL_CARD.md):
- ``kjv``: King James Bible, package ``bible-kjv-text`` (public domain; decompressed with
  the ``bible`` reader from package ``bible-kjv``).
- ``jargon``: the Jargon File 4.4.7, package ``jargon-text`` (public domain).
- ``pydoc``: Python 3.11 documentation sources, package ``python3.11-doc`` (PSF-2.0).
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from headwatch.training.errors import CorpusMissingError

KJV_DATA = Path("/usr/lib/bible.data")
JARGON_TXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
PYDOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")

# "Ge1:1 In the beginning ..." -> book, chapter, text
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):\d+\s+(.*)$")


@dataclass(frozen=True)
class Document:
    """One document of the corpus: its source name and its text."""

    source: str
    text: str


def _missing(what: Path | str, package: str) -> CorpusMissingError:
    return CorpusMissingError(
        f"expected {what} from the Debian package {package!r}, got nothing there; "
        f"install it with: apt-get install {package}"
    )


def read_kjv(data: Path = KJV_DATA, reader: str = "bible") -> list[Document]:
    """Return the King James Bible as one document per chapter, without verse references."""
    if not data.is_file():
        raise _missing(data, "bible-kjv-text")
    exe = shutil.which(reader)
    if exe is None:
        raise _missing(f"the {reader!r} program", "bible-kjv")
    out = subprocess.run(
        [exe, "-f", "-p", str(data.parent), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in out.splitlines():
        match = _VERSE.match(line.strip())
        if match:
            chapters.setdefault((match.group(1), match.group(2)), []).append(match.group(3))
        elif line.strip() and chapters:
            # a verse wrapped over several lines continues the last verse
            next(reversed(chapters.values()))[-1] += " " + line.strip()
    return [Document("kjv", " ".join(verses)) for verses in chapters.values()]


def read_jargon(path: Path = JARGON_TXT) -> list[Document]:
    """Return the Jargon File split into entries of roughly a few paragraphs each."""
    if not path.is_file():
        raise _missing(path, "jargon-text")
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    return _chunk_paragraphs("jargon", text)


def read_pydoc(root: Path = PYDOC_SOURCES) -> list[Document]:
    """Return the Python documentation reST sources, one document per file."""
    files = sorted(root.rglob("*.txt")) if root.is_dir() else []
    if not files:
        raise _missing(root, "python3.11-doc")
    return [Document("pydoc", f.read_text(encoding="utf-8", errors="replace")) for f in files]


def read_text_dir(root: Path) -> list[Document]:
    """Return every *.txt file under `root` as one document (for training on your own text)."""
    files = sorted(root.rglob("*.txt")) if root.is_dir() else []
    if not files:
        raise CorpusMissingError(f"expected *.txt files under {root}, got none")
    return [Document("text", f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _chunk_paragraphs(source: str, text: str, target_chars: int = 4000) -> list[Document]:
    docs: list[Document] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        size += len(para)
        if size >= target_chars:
            docs.append(Document(source, "\n\n".join(current)))
            current, size = [], 0
    if current:
        docs.append(Document(source, "\n\n".join(current)))
    return docs


READERS: dict[str, Callable[[], list[Document]]] = {
    "kjv": read_kjv,
    "jargon": read_jargon,
    "pydoc": read_pydoc,
}


def build_corpus(sources: Sequence[str] = ("kjv", "jargon", "pydoc")) -> list[Document]:
    """Read every named source from its installed Debian package and return its documents."""
    unknown = [s for s in sources if s not in READERS]
    if unknown or not sources:
        raise CorpusMissingError(f"expected sources among {sorted(READERS)}, got {list(sources)}")
    docs: list[Document] = []
    for name in sources:
        docs.extend(READERS[name]())
    return docs


def split_held_out(
    docs: Sequence[Document], every: int = 50
) -> tuple[list[Document], list[Document]]:
    """Split documents deterministically: every `every`-th document of each source is held out."""
    if every < 2:
        raise CorpusMissingError(f"expected every >= 2, got {every}")
    train: list[Document] = []
    held: list[Document] = []
    counts: dict[str, int] = {}
    for doc in docs:
        n = counts.get(doc.source, 0)
        counts[doc.source] = n + 1
        (held if n % every == every - 1 else train).append(doc)
    return train, held
