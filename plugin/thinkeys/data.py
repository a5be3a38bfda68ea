"""Plain-text English for fine-tuning, calibration and perplexity: Wikipedia articles, split by article.

The text comes from a MediaWiki XML dump that ships inside the ``gensim`` wheel as test data
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, CC BY-SA): a registry
package is the only offline-installable source of real encyclopedic prose here.

Why gensim's code is executed from the wheel instead of imported or copied:

* ``import gensim`` needs scipy, smart_open and gensim's compiled extensions, none of which this
  project installs (and the wheel is never installed, only downloaded);
* gensim is LGPL-2.1, so its markup filter is not copied into this Apache-2.0 code base.

So :func:`load_gensim_wiki_functions` reads ``gensim/corpora/wikicorpus.py`` and
``gensim/utils.py`` out of the downloaded wheel, keeps only the named top-level definitions that
``extract_pages`` and ``filter_wiki`` need (they are pure stdlib: ``re``, ``xml.etree.iterparse``,
``html.entities``) and executes exactly those. The page iteration and the markup filter that run
are gensim's own, unmodified.

After ``filter_wiki``, :func:`clean_article` drops what is still markup rather than prose:
section-heading lines, lines without letters, table residue, gallery items, and the
bibliographic sections ("References", "External links", ...); it strips bold/italic quote marks,
list/indent markers and image options (``200px``, ``alt=``) and collapses the gaps that removed
templates leave. Redirects, non-article namespaces,
disambiguation pages and stubs under gensim's ``ARTICLE_MIN_WORDS`` are skipped.

The split is by article, deterministic and independent of article order: an article goes to
``tune`` when ``sha256(f"{seed}:{title}")`` falls in the lowest ``tune_fraction`` of the ranking.
``tune`` is for fine-tuning and calibration, ``eval`` is held out and must never be tuned on.

File format (both splits): UTF-8, one article per block, blocks separated by one blank line; the
first line of a block is the article title, the following lines are its paragraphs. Articles
never contain blank lines, so :func:`read_articles` recovers them exactly.
"""

from __future__ import annotations

import ast
import io
import bz2
import hashlib
import json
import re
import types
import zipfile
from html.entities import name2codepoint
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator
from xml.etree.ElementTree import iterparse

from pydantic import BaseModel, Field
from tqdm import tqdm

from thinkeys.checkpoint import ThinKeyError

#: Where the dump lives inside the gensim wheel.
WIKI_DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: sha256 of that dump in gensim 4.4.0: a changed upload is refused rather than silently used.
WIKI_DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

#: Bump when the cleaning or splitting changes, so existing corpora are recognised as stale.
RECIPE_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_TUNE_FRACTION = 0.8
SPLITS = ("tune", "eval")

#: Definitions taken from gensim's sources (module path in the wheel -> top-level names).
_GENSIM_UTILS_NAMES = ("any2unicode", "to_unicode", "safe_unichr", "RE_HTML_ENTITY", "decode_htmlentities")
_GENSIM_WIKI_NAMES = (
    *(f"RE_P{i}" for i in range(18)),
    "ARTICLE_MIN_WORDS",
    "IGNORED_NAMESPACES",
    "get_namespace",
    "extract_pages",
    "filter_wiki",
    "remove_markup",
    "remove_template",
    "remove_file",
)

#: Sections made of citations and link lists, not prose: dropped with everything under them.
REFERENCE_SECTIONS = frozenset(
    {
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "see also",
        "notes and references",
        "references and notes",
    }
)

_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'', '''bold'''
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_TABLE_RESIDUE = re.compile(r"^(\{\||\|\}|\||!)")
_GALLERY_ITEM = re.compile(r"^(File|Image):", re.IGNORECASE)  # <gallery> lines: "File:x.jpg|caption"
_IMAGE_OPTIONS = re.compile(r"\b(\d+px|alt=)")  # leftovers of [[File:..|200px|alt=..|caption]]
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")  # "()" and "(, )" where templates were removed
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


class WikiFunctions(types.SimpleNamespace):
    """gensim's ``extract_pages``, ``filter_wiki`` and constants, executed from the wheel's sources."""

    extract_pages: Callable[..., Iterator[tuple[str, str, str]]]
    filter_wiki: Callable[[str], str]
    ARTICLE_MIN_WORDS: int
    IGNORED_NAMESPACES: list[str]


def _top_level(source: str, names: Iterable[str], where: str) -> ast.Module:
    """The top-level ``def``/``class``/``NAME = ...`` statements of ``source`` that define ``names``."""
    wanted = set(names)
    keep: list[ast.stmt] = []
    for node in ast.parse(source, filename=where).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        if name in wanted:
            keep.append(node)
            wanted.discard(name)
    if wanted:
        raise ThinKeyError(
            f"{where}: does not define {sorted(wanted)}; this gensim version is not the one the corpus "
            "recipe was written for (gensim==4.4.0)"
        )
    return ast.Module(body=keep, type_ignores=[])


def load_gensim_wiki_functions(wheel: str | Path) -> WikiFunctions:
    """Execute gensim's wiki-dump functions from a downloaded (not installed) gensim wheel.

    Only pure-stdlib definitions are taken, so nothing of gensim's compiled code or its
    scipy/smart_open dependencies is needed.
    """
    wheel = Path(wheel)
    with zipfile.ZipFile(wheel) as zf:
        utils_src = zf.read("gensim/utils.py").decode("utf-8")
        wiki_src = zf.read("gensim/corpora/wikicorpus.py").decode("utf-8")
    utils_ns: dict = {"re": re, "n2cp": name2codepoint}
    exec(compile(_top_level(utils_src, _GENSIM_UTILS_NAMES, "gensim/utils.py"), f"{wheel}!gensim/utils.py", "exec"), utils_ns)
    utils = types.SimpleNamespace(to_unicode=utils_ns["to_unicode"], decode_htmlentities=utils_ns["decode_htmlentities"])
    wiki_ns: dict = {"re": re, "iterparse": iterparse, "utils": utils}
    where = "gensim/corpora/wikicorpus.py"
    exec(compile(_top_level(wiki_src, _GENSIM_WIKI_NAMES, where), f"{wheel}!{where}", "exec"), wiki_ns)
    return WikiFunctions(**{name: wiki_ns[name] for name in _GENSIM_WIKI_NAMES})


def clean_article(title: str, text: str) -> str:
    """Turn ``filter_wiki`` output into prose lines (see the module docstring); '' if nothing is left."""
    lines = [title.strip()]
    skip_level = 0  # > 0 while inside a reference section of that heading level
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).strip().lower() in REFERENCE_SECTIONS else 0
            continue  # headings themselves are markup lines
        if skip_level or _TABLE_RESIDUE.match(line) or _GALLERY_ITEM.match(line):
            continue
        line = _IMAGE_OPTIONS.sub("", line)
        line = _EMPHASIS.sub("", line)
        line = _LIST_MARKER.sub("", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACES.sub(" ", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if any(ch.isalpha() for ch in line):
            lines.append(line)
    return "\n".join(lines) if len(lines) > 1 else ""


class Article(BaseModel):
    title: str
    page_id: str
    text: str  # title line + paragraph lines, no blank lines


def extract_articles(dump: IO[bytes], wiki: WikiFunctions, *, min_words: int | None = None) -> list[Article]:
    """Articles of a MediaWiki XML dump (bz2-decompressed stream), in dump order, cleaned."""
    min_words = wiki.ARTICLE_MIN_WORDS if min_words is None else min_words
    articles: list[Article] = []
    pages = wiki.extract_pages(dump, filter_namespaces=("0",))
    for title, text, page_id in tqdm(pages, desc="wiki pages", unit="page"):
        if not text or _REDIRECT.match(text):
            continue
        if any(title.startswith(ns + ":") for ns in wiki.IGNORED_NAMESPACES) or title.endswith("(disambiguation)"):
            continue
        cleaned = clean_article(title, wiki.filter_wiki(text))
        if len(cleaned.split()) < min_words:
            continue
        articles.append(Article(title=title, page_id=page_id, text=cleaned))
    return articles


def split_articles(
    articles: list[Article], *, seed: int = DEFAULT_SEED, tune_fraction: float = DEFAULT_TUNE_FRACTION
) -> dict[str, list[Article]]:
    """Split by article: the lowest ``tune_fraction`` of ``sha256(seed:title)`` go to ``tune``; dump order is kept."""
    if not 0.0 < tune_fraction < 1.0:
        raise ThinKeyError(f"tune_fraction {tune_fraction} must be strictly between 0 and 1")
    if len(articles) < 2:
        raise ThinKeyError(f"only {len(articles)} article(s) extracted: need at least 2 to make two splits")
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        raise ThinKeyError("duplicate article titles in the dump: the split by title would not be well defined")
    ranked = sorted(titles, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    n_tune = min(max(1, round(tune_fraction * len(articles))), len(articles) - 1)
    tune_titles = set(ranked[:n_tune])
    return {
        "tune": [a for a in articles if a.title in tune_titles],
        "eval": [a for a in articles if a.title not in tune_titles],
    }


# --- files and manifest ------------------------------------------------------------------------


class SplitInfo(BaseModel):
    file: str
    articles: int
    lines: int
    chars: int
    bytes: int
    sha256: str
    titles: list[str]


class CorpusManifest(BaseModel):
    """``manifest.json`` next to the split files: provenance, recipe and checksums."""

    recipe_version: int = RECIPE_VERSION
    source_package: str
    source_member: str
    source_sha256: str
    license: str = "CC BY-SA (Wikipedia text)"
    seed: int
    tune_fraction: float
    splits: dict[str, SplitInfo] = Field(description="'tune' (fine-tuning + calibration) and 'eval' (held out)")


MANIFEST_NAME = "manifest.json"


def format_articles(articles: list[Article]) -> str:
    return "\n\n".join(a.text for a in articles) + "\n"


def read_articles(path: str | Path) -> list[str]:
    """The articles of a split file (each: title line + paragraph lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [block for block in text.split("\n\n") if block.strip()]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_corpus(
    dest: Path, splits: dict[str, list[Article]], *, source_package: str, seed: int, tune_fraction: float
) -> CorpusManifest:
    """Write ``<split>.txt`` files and ``manifest.json`` into the (fresh, temporary) folder ``dest``."""
    infos: dict[str, SplitInfo] = {}
    for name in SPLITS:
        body = format_articles(splits[name])
        path = dest / f"{name}.txt"
        path.write_text(body, encoding="utf-8")
        infos[name] = SplitInfo(
            file=path.name,
            articles=len(splits[name]),
            lines=body.count("\n"),
            chars=len(body),
            bytes=path.stat().st_size,
            sha256=sha256_file(path),
            titles=[a.title for a in splits[name]],
        )
    manifest = CorpusManifest(
        source_package=source_package,
        source_member=WIKI_DUMP_MEMBER,
        source_sha256=WIKI_DUMP_SHA256,
        seed=seed,
        tune_fraction=tune_fraction,
        splits=infos,
    )
    (dest / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest


def check_corpus(folder: str | Path, *, seed: int = DEFAULT_SEED, tune_fraction: float = DEFAULT_TUNE_FRACTION) -> str | None:
    """Why ``folder`` is not a complete corpus of the current recipe, or None if it is."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"{manifest_path} is missing"
    try:
        manifest = CorpusManifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return f"{manifest_path} is not a valid manifest ({exc.__class__.__name__})"
    if (manifest.recipe_version, manifest.seed, manifest.tune_fraction) != (RECIPE_VERSION, seed, tune_fraction):
        return (
            f"{manifest_path} was made by recipe {manifest.recipe_version} (seed {manifest.seed}, "
            f"tune_fraction {manifest.tune_fraction}), not recipe {RECIPE_VERSION} (seed {seed}, tune_fraction {tune_fraction})"
        )
    if set(manifest.splits) != set(SPLITS):
        return f"{manifest_path} lists splits {sorted(manifest.splits)}, expected {list(SPLITS)}"
    for info in manifest.splits.values():
        path = folder / info.file
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != info.sha256:
            return f"{path} does not match the sha256 in {manifest_path} (modified or truncated)"
    return None


def load_manifest(folder: str | Path) -> CorpusManifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ThinKeyError(f"{path} is missing: run `thinkeys fetch` to build the corpus")
    return CorpusManifest.model_validate_json(path.read_text(encoding="utf-8"))


def build_wiki_corpus(
    gensim_wheel: Path,
    dest: Path,
    *,
    source_package: str,
    seed: int = DEFAULT_SEED,
    tune_fraction: float = DEFAULT_TUNE_FRACTION,
) -> CorpusManifest:
    """Extract, clean and split the dump inside ``gensim_wheel``; write the corpus into ``dest``."""
    wiki = load_gensim_wiki_functions(gensim_wheel)
    with zipfile.ZipFile(gensim_wheel) as zf:
        try:
            raw = zf.read(WIKI_DUMP_MEMBER)
        except KeyError:
            raise ThinKeyError(f"{gensim_wheel.name} has no {WIKI_DUMP_MEMBER}: the wrong gensim version was downloaded") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WIKI_DUMP_SHA256:
        raise ThinKeyError(
            f"{WIKI_DUMP_MEMBER} in {gensim_wheel.name} has sha256 {digest}, expected {WIKI_DUMP_SHA256}: "
            "the registry served a different file than the one this recipe was made for"
        )
    articles = extract_articles(bz2.BZ2File(io.BytesIO(raw)), wiki)
    splits = split_articles(articles, seed=seed, tune_fraction=tune_fraction)
    return write_corpus(dest, splits, source_package=source_package, seed=seed, tune_fraction=tune_fraction)
