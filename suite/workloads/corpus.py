"""The text scope stability trains on: the Python standard library's own sources, as bytes.

Every machine that runs the suite has them, so a stability run needs no download. What is read:
- every `*.py` file under the running interpreter's `sysconfig.get_paths()["stdlib"]`, except
  folders that differ between builds of one Python version: installed packages
  (`site-packages`, `dist-packages`), the build's `config-*` folder, the platform's generated
  `_sysconfigdata_*.py`, and the test suites (`test`, `tests`, `idle_test`), which some
  distributions ship apart; there is no separate documentation: `pydoc_data/topics.py` carries
  the reference manual's topics and is read like any other file;
- in the order of the files' paths relative to that folder (POSIX form, sorted), each file's
  bytes followed by one 0 byte (Python source never contains one), so a document boundary is a
  token of its own.
Tokens are the bytes (vocabulary 256). Split: a file is validation when the first 8 hex digits
of sha256 of its relative path, read as a number, are divisible by VAL_EVERY; training
otherwise. The rule looks at the path, not the contents, so an edited file stays on its side.
`Corpus.describe` gives the sizes and the sha256 of both streams: runs with the same hash trained
and were validated on the same bytes.

Batches: the training stream cut into windows of seq + 1 bytes at a stride of seq, visited in a
permutation drawn per epoch from the case's seed; validation is a fixed set of VAL_WINDOWS
windows spread evenly over the validation stream; the probe sequence (gains) is its first.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_EVERY = 10              # about one file in ten is validation
VAL_WINDOWS = 64            # validation sequences, spread over the validation stream
SEPARATOR = b"\x00"
SKIP_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test")
RULE = (f"*.py under sysconfig stdlib, sorted by relative path, each followed by one 0 byte; "
        f"without {', '.join(SKIP_DIRS)}, config-*/ and _sysconfigdata_*.py; validation when "
        f"int(sha256(relative path)[:8], 16) % {VAL_EVERY} == 0")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[str]:
    """The relative paths read, in order."""
    out = []
    for folder, dirs, names in os.walk(root):
        # pruned here, not filtered after: site-packages alone can hold ten times the files
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-")]
        rel = Path(folder).relative_to(root)
        out += [(rel / name).as_posix() for name in names
                if name.endswith(".py") and not name.startswith("_sysconfigdata_")]
    return sorted(out)


def is_validation(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % VAL_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    root: str
    train: bytes
    val: bytes
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]

    def describe(self) -> dict:
        """What a record keeps so that runs are comparable: where, how, how much, which bytes."""
        return {"source": self.root,
                "python": sys.version.split()[0],
                "rule": RULE,
                "files": {"train": len(self.train_files), "val": len(self.val_files)},
                "bytes": {"train": len(self.train), "val": len(self.val)},
                "sha256": {"train": hashlib.sha256(self.train).hexdigest(),
                           "val": hashlib.sha256(self.val).hexdigest()},
                "val_windows": VAL_WINDOWS}


@functools.lru_cache(maxsize=2)
def load(root: str | None = None) -> Corpus:
    """The corpus of `root` (default: this interpreter's standard library), read once per process."""
    base = Path(root) if root else stdlib_root()
    files = source_files(base)
    train, val, train_files, val_files = [], [], [], []
    for rel in files:
        data = (base / rel).read_bytes() + SEPARATOR
        if is_validation(rel):
            val.append(data)
            val_files.append(rel)
        else:
            train.append(data)
            train_files.append(rel)
    return Corpus(str(base), b"".join(train), b"".join(val), tuple(train_files), tuple(val_files))


def unavailable(seq: int, root: str | None = None) -> str | None:
    """Why this machine cannot give the corpus for sequences of `seq` tokens, or None."""
    base = Path(root) if root else stdlib_root()
    if not base.is_dir() or not source_files(base):
        return f"no Python standard library sources (*.py) under {base} to train on"
    c = load(str(base))
    if len(c.val) < seq + 1 or len(c.train) < seq + 1:
        return (f"the standard library under {base} is too small for seq {seq} "
                f"({len(c.train)} training and {len(c.val)} validation bytes)")
    return None


def as_tensor(data: bytes, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


class Batches:
    """(tokens, targets) [B, seq] int64 on `device`: training windows in a seeded order per epoch,
    the fixed validation windows, and the probe sequence."""

    def __init__(self, corpus: Corpus, seq: int, batch: int, seed: int, device):
        self.seq, self.batch, self.seed, self.device = seq, batch, seed, torch.device(device)
        self.train = as_tensor(corpus.train, device)
        self.val = as_tensor(corpus.val, device)
        self.starts = torch.arange(0, len(corpus.train) - seq, seq)    # windows of seq + 1
        self.offsets = torch.arange(seq + 1, device=device)
        self.epoch, self.order, self.pos = -1, None, 0
        val_starts = torch.arange(0, len(corpus.val) - seq, seq)
        pick = torch.linspace(0, len(val_starts) - 1, min(VAL_WINDOWS, len(val_starts)))
        self.val_starts = val_starts[pick.round().long()].to(device)

    def _windows(self, stream: torch.Tensor, starts: torch.Tensor):
        w = stream[starts.unsqueeze(1) + self.offsets].long()
        return w[:, :-1], w[:, 1:]

    def next_train(self):
        if self.order is None or self.pos + self.batch > len(self.order):
            self.epoch += 1
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self.order = self.starts[torch.randperm(len(self.starts), generator=gen)].to(self.device)
            self.pos = 0
        starts = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self._windows(self.train, starts)

    def validation(self):
        """The validation windows in batches of 4 x `batch`: without autograd a forward holds a
        few activations at a time, far less than a training step's."""
        size = 4 * self.batch
        for i in range(0, len(self.val_starts), size):
            yield self._windows(self.val, self.val_starts[i:i + size])

    def probe(self):
        """One sequence [1, seq]: the first validation window (the paper's "selected sequence")."""
        tokens, _ = self._windows(self.val, self.val_starts[:1])
        return tokens
