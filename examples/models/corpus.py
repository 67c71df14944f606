"""A real English text corpus that is always available offline: Python standard-library docstrings.

Why this corpus:

- it is real English prose written by people for people (what a function does, what
  its arguments mean, caveats), the kind of text sentence embedders are used on for
  documentation search, not synthetic or random tokens;
- it is on every machine that runs Python, with no download, no data package and no
  licence question (the docstrings are part of CPython, PSF licence);
- it is large enough (hundreds of thousands of tokens over the fixed module list
  below) to cut hundreds of full 256-token passages, and it has topical structure
  (each module is a topic), so nearest-neighbour retrieval has meaningful answers;
- it is deterministic for a given Python version: a fixed module list, members in
  sorted-name order, the docstrings written in the module (``__doc__``, not
  inherited ones), whitespace-normalised with `inspect.cleandoc`. Different CPython
  versions edit some docstrings, so the exact passages depend on the Python version,
  which results record.

A second source, `other_source_texts()`, is NumPy's docstrings (NumPy is a core
dependency, so it is always installed): another project's writing (numpydoc sections,
array vocabulary, `>>>` examples), for measuring quantization on text the build's
calibration (the standard-library docstrings) never saw.

Documents are split deterministically into two disjoint pools by a CRC32 of their
qualified name: one in five goes to the *query* pool, the rest to the *passage* pool.
`queries()` are first lines (summary sentences) of function / method docstrings of the
query pool, so a query is never a piece of a passage, while its siblings from the same
module usually are (retrieval has related answers). `passages()` concatenates the
passage pool in order and cuts it into windows of exactly `n_tokens` tokens ([CLS],
n_tokens - 2 text tokens, [SEP]) with no padding, then takes `count` windows evenly
spaced over the whole stream so every module is represented.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import zlib
from dataclasses import dataclass

import numpy as np

#: the modules whose docstrings make the corpus, in this order: pure-Python or core
#: modules present on every platform in CPython 3.10 to 3.13, without import side effects
MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "bz2", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookiejar", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct",
    "subprocess", "symtable", "tabnanny", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)

#: a second, different source of real text: NumPy's public API docstrings
NUMPY_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial.polynomial",
                 "numpy.lib.recfunctions", "numpy.strings", "numpy.char")

#: one document in QUERY_EVERY goes to the query pool (by CRC32 of its qualified name)
QUERY_EVERY = 5
#: docstrings shorter than this many words are skipped (e.g. "Return self.")
MIN_WORDS = 6


@dataclass(frozen=True)
class Document:
    """One docstring: `name` is its qualified name, e.g. 'collections.OrderedDict.popitem'."""

    name: str
    text: str
    kind: str  # "module", "class" or "function"

    @property
    def pool(self) -> str:
        return "query" if zlib.crc32(self.name.encode()) % QUERY_EVERY == 0 else "passage"


@dataclass(frozen=True)
class Passage:
    """Exactly len(input_ids) tokens of real text: [CLS] text tokens [SEP], no padding."""

    input_ids: np.ndarray  # int64 [n_tokens]
    text: str
    sources: tuple[str, ...]  # qualified names of the docstrings it spans


def _clean(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None
    text = inspect.cleandoc(doc).strip()
    return text if len(text.split()) >= MIN_WORDS else None


def _defined_in(member: object, module_name: str) -> bool:
    """True for members a module defines itself, or its C accelerator (heapq -> _heapq)."""
    owner = getattr(member, "__module__", None) or ""
    return owner == module_name or owner == "_" + module_name.rsplit(".", 1)[-1]


def _own_members(obj: object, module_name: str):
    """Public classes / functions of a module (not re-exports), or the public methods and
    properties a class defines itself; sorted by name."""
    is_class = inspect.isclass(obj)
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            member = member.fget
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if is_class or _defined_in(member, module_name):
            yield name, member


@functools.lru_cache(maxsize=2)
def documents(modules: tuple[str, ...] = MODULES) -> tuple[Document, ...]:
    """Every docstring of the corpus (module, public classes, their methods, public functions),
    in `modules` order then sorted-name order, deduplicated by text."""
    docs: list[Document] = []
    seen: set[str] = set()

    def add(name: str, obj: object, kind: str) -> None:
        text = _clean(getattr(obj, "__doc__", None) if kind != "module" else obj.__doc__)
        if text is None or text in seen:
            return
        seen.add(text)
        docs.append(Document(name, text, kind))

    for mod_name in modules:
        module = importlib.import_module(mod_name)
        add(mod_name, module, "module")
        for name, member in _own_members(module, mod_name):
            qual = f"{mod_name}.{name}"
            if inspect.isclass(member):
                add(qual, member, "class")
                for meth_name, meth in _own_members(member, mod_name):
                    if not inspect.isclass(meth):
                        add(f"{qual}.{meth_name}", meth, "function")
            else:
                add(qual, member, "function")
    return tuple(docs)


def _pool(pool: str) -> list[Document]:
    return [d for d in documents() if d.pool == pool]


def passages(tokenizer, n_tokens: int, count: int) -> list[Passage]:
    """`count` passages of exactly `n_tokens` tokens of real docstring text, no padding.

    The passage pool's docstrings are tokenized (no special tokens), concatenated in
    corpus order and cut into consecutive windows of n_tokens - 2 tokens, each starting
    at a word start (not a '##' continuation piece); each window is wrapped in [CLS] …
    [SEP]. `count` windows are taken evenly spaced over all windows. Raises ValueError if
    the corpus has fewer than `count` windows of that length."""
    if n_tokens < 3:
        raise ValueError(f"n_tokens must be >= 3 ([CLS] text [SEP]), got {n_tokens}")
    docs = _pool("passage")
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    ids = np.fromiter((t for seq in encoded for t in seq), dtype=np.int64)
    owner = np.repeat(np.arange(len(docs)), [len(seq) for seq in encoded])
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    continuation = np.array([tok.startswith("##") for tok in vocab])[ids]
    width = n_tokens - 2
    starts, pos = [], 0
    while True:
        while pos < len(ids) and continuation[pos]:
            pos += 1
        if pos + width > len(ids):
            break
        starts.append(pos)
        pos += width
    if len(starts) < count:
        raise ValueError(f"the corpus has {len(starts)} passages of {n_tokens} tokens, fewer than the {count} asked")
    chosen = [starts[i] for i in np.linspace(0, len(starts) - 1, count).round().astype(int)] if count else []
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    for s in chosen:
        window = ids[s:s + width]
        full = np.concatenate([[cls_id], window, [sep_id]]).astype(np.int64)
        names = tuple(dict.fromkeys(docs[i].name for i in owner[s:s + width]))
        out.append(Passage(full, tokenizer.decode(window.tolist()), names))
    return out


def calibration_texts(count: int, *, min_words: int = 20) -> list[str]:
    """`count` real texts for quantization calibration, disjoint from both `passages()`
    and `queries()`: the module and class docstrings of the query pool (passages use the
    other pool, queries are function summaries), longest first, whitespace collapsed to
    one line each."""
    texts = [" ".join(d.text.split()) for d in _pool("query") if d.kind != "function"]
    texts = sorted((t for t in texts if len(t.split()) >= min_words), key=lambda t: (-len(t), t))
    if len(texts) < count:
        raise ValueError(f"the corpus has {len(texts)} calibration texts of >= {min_words} words, fewer than {count}")
    return texts[:count]


def other_source_texts(count: int, *, min_words: int = 20) -> list[str]:
    """`count` real texts from another source than everything above: NumPy's docstrings
    (NUMPY_MODULES), one line each, in a deterministic order spread over the modules
    (sorted by CRC32 of the text). Evaluation data for builds calibrated on
    `calibration_texts()`: same language, different writers, layout and vocabulary."""
    texts = {" ".join(d.text.split()): None for d in documents(NUMPY_MODULES)}
    texts = sorted((t for t in texts if len(t.split()) >= min_words), key=lambda t: (zlib.crc32(t.encode()), t))
    if len(texts) < count:
        raise ValueError(f"NumPy has {len(texts)} docstrings of >= {min_words} words, fewer than {count}")
    return texts[:count]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_SIGNATURE = re.compile(r"^[\w.]+\(")


def queries(count: int, *, min_words: int = 4, max_words: int = 30) -> list[str]:
    """`count` short real sentences: the summary lines of function / method docstrings of
    the query pool (never part of a passage), deduplicated, in a deterministic order
    spread over all modules (sorted by CRC32 of the text)."""
    found: dict[str, None] = {}
    for d in _pool("query"):
        if d.kind != "function":
            continue
        first = d.text.split("\n\n", 1)[0].replace("\n", " ").strip()
        words = _SENTENCE_END.split(first, 1)[0].split()
        first = " ".join(words)
        if not min_words <= len(words) <= max_words or not first[0].isalpha() or _SIGNATURE.match(first) or "->" in first:
            continue  # too short / long, or a call signature ("S.pack_into(buffer, ...)") rather than a sentence
        found.setdefault(first, None)
    ordered = sorted(found, key=lambda s: (zlib.crc32(s.encode()), s))
    if len(ordered) < count:
        raise ValueError(f"the corpus has {len(ordered)} queries, fewer than the {count} asked")
    return ordered[:count]


def feeds(token_ids: list[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Model feeds for unpadded sequences of one length: input_ids and an all-ones mask."""
    ids = np.asarray(np.stack(list(token_ids)) if not isinstance(token_ids, np.ndarray) else token_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
