"""The text bench/pretrain.py trains on, and the batches it draws from it.

A corpus is bytes (the vocabulary is the 256 byte values, so nothing is downloaded: no
tokenizer, no data set): the standard library's own ``.py`` sources, read in sorted order,
which makes a run reproducible on a given Python install, or any file named by ``--data``.
Or it is token ids already on disk (``--tokenized``, formats in :func:`load_tokenized`).
Either way the last ``--validation-fraction`` is held out.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from common import VOCAB_SIZE


class Corpus(NamedTuple):
    train: Any  # 1-D token ids: a uint8 byte tensor, an int tensor or a NumPy memmap
    validation: Any
    source: str
    vocab_size: int = VOCAB_SIZE


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files in a fixed order (third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_stdlib(max_bytes: int) -> bytes:
    chunks, total = [], 0
    for path in stdlib_sources():
        if total >= max_bytes:
            break
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)[:max_bytes]


def load_corpus(
    data_path: str | None = None, max_bytes: int = 2_000_000, validation_fraction: float = 0.1, min_split: int = 2
) -> Corpus:
    """At most ``max_bytes`` bytes of ``data_path`` (default: the stdlib sources), split so
    that the last ``validation_fraction`` is held out; each split must hold ``min_split``
    bytes (at least one training window)."""
    if data_path:
        raw, source = Path(data_path).read_bytes()[:max_bytes], data_path
    else:
        raw, source = read_stdlib(max_bytes), f"python {sys.version.split()[0]} stdlib sources"
    return split_corpus(byte_tensor(raw), source, validation_fraction, min_split, VOCAB_SIZE)


def split_corpus(tokens, source: str, validation_fraction: float, min_split: int, vocab_size: int) -> Corpus:
    """Hold out the last ``validation_fraction`` of ``tokens`` (slices: a memmap stays on disk)."""
    split = int(len(tokens) * (1 - validation_fraction))
    if min(split, len(tokens) - split) < min_split:
        raise ValueError(
            f"corpus {source!r} has {len(tokens)} tokens: "
            f"too few for train and validation windows of {min_split} tokens"
        )
    return Corpus(tokens[:split], tokens[split:], source, vocab_size)


def load_tokenized(
    path: str, validation_fraction: float = 0.1, min_split: int = 2, vocab_size: int | None = None
) -> Corpus:
    """Token ids on disk: a 1-D integer tensor written with ``torch.save`` (``.pt``), a 1-D
    integer NumPy array (``.npy``) or a flat file of little-endian ``uint16`` ids (``.bin``, as
    nanoGPT writes them); the last two are memory-mapped so a corpus larger than RAM works.
    The vocabulary is ``vocab_size``, by default the largest id + 1."""
    suffix = Path(path).suffix
    if suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif suffix == ".bin":
        tokens = np.memmap(path, dtype="<u2", mode="r")
    else:
        tokens = torch.load(path, weights_only=True)
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(
                f"--tokenized {path!r}: expected a tensor saved with torch.save, got {type(tokens).__name__}"
            )
    if isinstance(tokens, np.ndarray):
        integer = np.issubdtype(tokens.dtype, np.integer)
    else:
        integer = not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)
    if tokens.ndim != 1 or not integer:
        raise ValueError(
            f"--tokenized {path!r}: expected 1-D integer token ids, got {tokens.dtype} of shape {tuple(tokens.shape)}"
        )
    if vocab_size is None:  # one pass over the ids; pass --vocab-size to skip it on a huge corpus
        vocab_size = int(tokens.max()) + 1
    return split_corpus(tokens, f"{path} (token ids)", validation_fraction, min_split, vocab_size)


def load_data(args: argparse.Namespace) -> Corpus:
    """The corpus the flags name: ``--tokenized`` ids, else ``--data``'s bytes or the stdlib's."""
    if args.tokenized:
        return load_tokenized(args.tokenized, args.validation_fraction, args.seq_len, args.vocab_size)
    return load_corpus(args.data, args.corpus_bytes, args.validation_fraction, min_split=args.seq_len)


def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(tokens, starts: list[int], seq_len: int) -> torch.Tensor:
    """Token ids (batch x seq_len): the sequences of ``tokens`` that begin at ``starts``.
    ``tokens`` may be a NumPy memmap: only these windows are read, as int64 (torch has few
    uint16 ops)."""
    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))
    return torch.stack([tokens[s : s + seq_len] for s in starts]).long()


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)
    return windows(tokens, starts.tolist(), seq_len)


def validation_batches(tokens: torch.Tensor, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Evenly spaced windows over the whole validation split: the same for every optimizer
    and every evaluation, so successive losses are comparable."""
    starts = torch.linspace(0, len(tokens) - seq_len, num_batches * batch_size).long().tolist()
    return list(windows(tokens, starts, seq_len).split(batch_size))
