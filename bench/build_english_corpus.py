"""A natural-language English corpus from Debian's packages, for the science runs on the device
(which reaches no network): the Collaborative International Dictionary of English (dict-gcide,
a paragraph per entry) and WordNet's glosses (wordnet-base, eight glosses a paragraph), written
as one .txt.gz (a document per paragraph, data/corpus.py), small enough to carry (~16 MB).

    python3 bench/build_english_corpus.py .corpus/english.txt.gz    # needs apt-get and dpkg
"""

import gzip
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("dict-gcide", "wordnet-base")
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
GLOSSES_PER_PARAGRAPH = 8


def extract(packages, folder: Path) -> Path:
    """The packages' files under folder/root (apt-get download, dpkg -x)."""
    subprocess.run(["apt-get", "download", *packages], cwd=folder, check=True)
    root = folder / "root"
    for deb in folder.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def dictionary_entries(root: Path) -> list[str]:
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8",
                   errors="replace") as f:
        text = f.read()
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]


def wordnet_paragraphs(root: Path) -> list[str]:
    glosses = []
    for part in WORDNET_PARTS:
        for line in (root / f"usr/share/wordnet/data.{part}").open(encoding="utf-8",
                                                                   errors="replace"):
            if not line.startswith("  ") and "|" in line:  # license header lines start "  "
                glosses.append(line.split("|", 1)[1].strip())
    return ["\n".join(glosses[i:i + GLOSSES_PER_PARAGRAPH])
            for i in range(0, len(glosses), GLOSSES_PER_PARAGRAPH)]


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(PACKAGES, Path(tmp))
        paragraphs = dictionary_entries(root) + wordnet_paragraphs(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(paragraphs) + "\n")
    chars = sum(map(len, paragraphs))
    print(f"{out}: {len(paragraphs)} paragraphs, {chars / 1e6:.1f} M characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
