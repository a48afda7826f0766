"""A natural-language English corpus from Debian's packages, for the science runs on the device
(which reaches no network), written as one .txt.gz (a document per paragraph, data/corpus.py)
small enough to carry (a device call carries at most 64 MiB):

- the Collaborative International Dictionary of English (dict-gcide, a paragraph per entry) and
  WordNet's glosses (wordnet-base, eight glosses a paragraph);
- the prose of the documentation packages (the Linux kernel's, Python's, PostgreSQL's and git's
  manuals, the Debian Administrator's Handbook and Reference, the GNU coding standards): the text
  of their HTML paragraphs, list items and definitions, code blocks left out;
- Perl's manual (perl-doc): the text paragraphs of its POD pages, verbatim code left out.

    python3 bench/build_english_corpus.py .corpus/english.txt.gz    # needs apt-get and dpkg
"""

import gzip
import html.parser
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DICTIONARY_PACKAGES = ("dict-gcide", "wordnet-base")
HTML_MANUALS = {  # package: its HTML folder under usr/share/doc
    "linux-doc-6.1": "linux-doc-6.1/html",
    "python3.11-doc": "python3.11/html",
    "postgresql-doc-15": "postgresql-doc-15/html",
    "git-doc": "git-doc",
    "debian-handbook": "debian-handbook/html/en-US",
    "debian-reference-en": "debian-reference-en/docs",
    "gnu-standards": "gnu-standards",
}
POD_PACKAGE = "perl-doc"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
GLOSSES_PER_PARAGRAPH = 8
MIN_PARAGRAPH_CHARS = 40
MIN_PARAGRAPH_WORDS = 8  # drops headings, menu entries and one-line captions


def extract(packages, folder: Path) -> Path:
    """The packages' files under folder/root (apt-get download, dpkg -x)."""
    subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True)
    root = folder / "root"
    for deb in folder.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def is_prose(text: str) -> bool:
    return len(text) > MIN_PARAGRAPH_CHARS and len(text.split()) >= MIN_PARAGRAPH_WORDS


def dictionary_entries(root: Path) -> list[str]:
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8",
                   errors="replace") as f:
        text = f.read()
    paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if len(p) > MIN_PARAGRAPH_CHARS]


def wordnet_paragraphs(root: Path) -> list[str]:
    glosses = []
    for part in WORDNET_PARTS:
        for line in (root / f"usr/share/wordnet/data.{part}").open(encoding="utf-8",
                                                                   errors="replace"):
            if not line.startswith("  ") and "|" in line:  # license header lines start "  "
                glosses.append(line.split("|", 1)[1].strip())
    return ["\n".join(glosses[i:i + GLOSSES_PER_PARAGRAPH])
            for i in range(0, len(glosses), GLOSSES_PER_PARAGRAPH)]


class HtmlProse(html.parser.HTMLParser):
    """The text of a page's block elements, one paragraph each; code blocks, scripts and
    styles are skipped, inline markup (links, inline code) is kept as text."""

    BLOCKS = {"p", "li", "dd", "dt", "blockquote", "td", "h1", "h2", "h3", "h4", "h5", "h6"}
    SKIPPED = {"pre", "script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self.flush()

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data):
        if not self._skipping:
            self._parts.append(data)

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
        self._parts = []
        if is_prose(text):
            self.paragraphs.append(text)


def html_paragraphs(folder: Path) -> list[str]:
    paragraphs = []
    for page in sorted(folder.rglob("*.html")):
        parser = HtmlProse()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        parser.flush()
        paragraphs += parser.paragraphs
    return paragraphs


POD_CODES = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")  # B<bold>, C<code>, L<link|...>


def pod_paragraphs(folder: Path) -> list[str]:
    """POD's ordinary paragraphs: neither commands (=head1 ...) nor verbatim (indented) code."""
    paragraphs = []
    for page in sorted(folder.rglob("*.pod")):
        for block in re.split(r"\n\s*\n", page.read_text(encoding="utf-8", errors="replace")):
            if block.startswith(("=", " ", "\t")):
                continue
            text = re.sub(r"\s+", " ", POD_CODES.sub(lambda m: m.group(1).split("|")[0], block))
            if is_prose(text.strip()):
                paragraphs.append(text.strip())
    return paragraphs


def all_paragraphs(root: Path) -> dict[str, list[str]]:
    sources = {"gcide": dictionary_entries(root), "wordnet": wordnet_paragraphs(root)}
    for package, folder in HTML_MANUALS.items():
        sources[package] = html_paragraphs(root / "usr/share/doc" / folder)
    sources[POD_PACKAGE] = pod_paragraphs(root / "usr/share/perl")
    return sources


def main(out: Path) -> None:
    packages = (*DICTIONARY_PACKAGES, *HTML_MANUALS, POD_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        sources = all_paragraphs(extract(packages, Path(tmp)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for paragraphs in sources.values():
            f.write("\n\n".join(paragraphs) + "\n\n")
    for name, paragraphs in sources.items():
        print(f"  {name}: {len(paragraphs)} paragraphs, "
              f"{sum(map(len, paragraphs)) / 1e6:.1f} M characters")
    chars = sum(len(p) for paragraphs in sources.values() for p in paragraphs)
    print(f"{out}: {sum(map(len, sources.values()))} paragraphs, {chars / 1e6:.1f} M characters, "
          f"{out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
