"""Training data: the MQAR task, byte-level text, and the grain pipeline that feeds both.

Every example is a dict of ``[seq_len]`` numpy arrays, the format ``jaxlayers.models.lm.loss``
reads: ``tokens`` (int32 inputs), ``targets`` (int32; ``targets[i]`` is what the logits at
position ``i`` must predict), ``mask`` (float32; 1 = the target counts) and, for packed text,
``segment_ids`` (int32; 0 = padding). MQAR examples also carry ``query_pos`` (int32
``[num_kv_pairs]``, the positions with a target, for ``train.losses.query_loss``). ``index``
(int64, the example's position in its stream) is bookkeeping and never reaches the model.

MQAR (multi-query associative recall), as defined in "Zoology: Measuring and Improving Recall in
Efficient Language Models" (Arora et al., 2023). With ``N`` key-value pairs, sequence length
``T`` and vocabulary ``V``::

    tokens  = k_1 v_1 k_2 v_2 ... k_N v_N | query region of length T - 2N
    keys   k_j drawn without replacement from [1, V/2)     values v_j from [V/2, V)
    the query region is all 0 (the filler token) except that key k_j is repeated at offset
    2·g_j, where the gaps g_j are drawn without replacement from {0, ..., (T-2N)/2 - 1} with
    P(g) ∝ (g + 1)^(a - 1)   (a power law; a = 0.01 as in the paper puts most queries early)
    targets = v_j at the position of each repeated k_j, mask = 1 there and 0 elsewhere

so the model must recall, for every query key, the value that followed it in the context. The
paper's generator shifts labels by one; here the target sits at the query key's own position,
which is the same prediction (the value is the next token after the query key). Accuracy is the
fraction of queries whose argmax equals the value. Example ``i`` of a split depends only on
``(seed, split, i)`` (the key of a numpy Philox generator), so streams are reproducible,
random-access and identical for any number of processes; the eval split uses another ``split``.

Byte-level text: each document (a paragraph: text separated by blank lines) becomes
``[BOS] + utf-8 bytes``; token ids 0..255 are bytes, 256 is BOS, and the vocabulary is padded to
:data:`BYTE_VOCAB` = 264 (a multiple of 8, so it shards). Documents are shuffled, concatenated and
cut into rows of ``seq_len + 1`` tokens overlapping by one (concat-then-split packing):
``tokens = row[:-1]``, ``targets = row[1:]``, ``segment_ids`` number the documents inside a row
from 1, and ``mask`` is 0 where the target starts another document (or is padding), so no
prediction crosses a document boundary. The last partial row is padded (segment id 0, mask 0).
A document goes to the validation split when ``crc32(text) mod 10_000 < val_fraction·10_000``
(stable when files are added). Bits per byte = validation loss / ln 2 (one token per byte).

The default corpus (``train/data/corpus.txt``) is original prose written for this project and
dedicated to the public domain (CC0 1.0); see ``train/data/README.md``. It needs no download.

Pipeline (grain): ``MapDataset`` of examples -> ``shuffle(seed)`` (reshuffled every epoch) ->
``repeat()`` -> per-process view -> ``batch(local_batch)`` -> ``to_iter_dataset()``. The
per-process view gives process ``p`` of ``P`` the rows ``[p·L, (p+1)·L)`` of every global batch
of ``G = P·L`` rows, so the global batch assembled with ``jax.make_array_from_process_local_data``
is the same for any ``P``. The iterator's position is ``iterator.get_state()`` (a small dict)
and ``set_state`` restores it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

__all__ = [
    "BOS",
    "BYTE_VOCAB",
    "MODEL_KEYS",
    "MQARSpec",
    "mqar_example",
    "mqar_dataset",
    "default_corpus_path",
    "load_documents",
    "split_documents",
    "PackedRows",
    "text_datasets",
    "ProcessBatches",
    "process_rows",
    "eval_batches",
]

BOS = 256
BYTE_VOCAB = 264
# Keys of an example that the model reads; the rest (``index``) is bookkeeping.
MODEL_KEYS = ("tokens", "targets", "mask", "segment_ids", "query_pos")
_TRAIN, _EVAL = 0, 1


# --------------------------------------------------------------------------------------------
# MQAR
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MQARSpec:
    """The knobs of the MQAR task (see the module docstring)."""

    seq_len: int = 128
    vocab_size: int = 8192
    num_kv_pairs: int = 16
    power_a: float = 0.01
    seed: int = 0

    def __post_init__(self):
        n, t, v = self.num_kv_pairs, self.seq_len, self.vocab_size
        if n <= 0:
            raise ValueError(f"num_kv_pairs must be positive; got {n}")
        if t < 4 * n:
            raise ValueError(
                f"seq_len must be >= 4 * num_kv_pairs = {4 * n} (context 2N plus N distinct query "
                f"slots); got seq_len={t}"
            )
        if v // 2 - 1 < n:
            raise ValueError(
                f"vocab_size must give at least num_kv_pairs={n} distinct keys in [1, vocab/2); "
                f"got vocab_size={v}"
            )
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1]; got {self.power_a}")

    @property
    def query_slots(self) -> int:
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    @property
    def gap_probs(self) -> np.ndarray:
        """P(g) ∝ (g + 1)^(a - 1) over the query slots g = 0 .. query_slots - 1."""
        g = np.arange(1, self.query_slots + 1, dtype=np.float64)
        p = g ** (self.power_a - 1.0)
        return p / p.sum()

    @functools.cached_property
    def log_gap_probs(self) -> np.ndarray:
        return np.log(self.gap_probs)


def _philox_key(seed: int, split: int, index: int) -> np.ndarray:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0; got seed={seed}, index={index}")
    return np.array([(int(seed) << 4) | int(split), int(index)], np.uint64)


def mqar_example(spec: MQARSpec, index: int, split: int = _TRAIN) -> dict[str, np.ndarray]:
    """Example ``index`` of an MQAR split (a pure function of ``spec``, ``split``, ``index``)."""
    n, t, v = spec.num_kv_pairs, spec.seq_len, spec.vocab_size
    rng = np.random.Generator(np.random.Philox(key=_philox_key(spec.seed, split, index)))
    half = v // 2
    keys = rng.choice(half - 1, size=n, replace=False) + 1
    values = rng.choice(v - half, size=n, replace=False) + half
    # Gumbel top-k: the n largest of log p + Gumbel noise are a draw without replacement with
    # probabilities p (the same law as numpy's sequential choice(..., p=p), ~15x faster).
    gaps = np.argsort(-(spec.log_gap_probs + rng.gumbel(size=spec.query_slots)))[:n]
    tokens = np.zeros(t, np.int32)
    tokens[0 : 2 * n : 2] = keys
    tokens[1 : 2 * n : 2] = values
    query_pos = 2 * n + 2 * gaps
    tokens[query_pos] = keys
    targets = np.zeros(t, np.int32)
    targets[query_pos] = values
    mask = np.zeros(t, np.float32)
    mask[query_pos] = 1.0
    return {
        "tokens": tokens,
        "targets": targets,
        "mask": mask,
        "query_pos": np.sort(query_pos).astype(np.int32),
        "index": np.int64(index),
    }


def mqar_dataset(spec: MQARSpec, num_examples: int | None = None, split: int = _TRAIN):
    """MQAR examples as a grain ``MapDataset`` (``num_examples=None``: an endless stream)."""
    n = sys.maxsize if num_examples is None else num_examples
    return grain.MapDataset.range(n).map(lambda i: mqar_example(spec, i, split))


# --------------------------------------------------------------------------------------------
# Byte-level text
# --------------------------------------------------------------------------------------------


def default_corpus_path() -> Path:
    return Path(str(importlib.resources.files("train") / "data" / "corpus.txt"))


def load_documents(files: Sequence[str | Path] = ()) -> list[bytes]:
    """Paragraphs (split at blank lines) of ``files``, or of the embedded corpus when empty."""
    paths = [Path(f) for f in files] if files else [default_corpus_path()]
    docs: list[bytes] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"data.text_files: no such file {str(path)!r} (give existing text files, or none "
                f"to use the embedded corpus)"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(p.strip().encode() for p in re.split(r"\n\s*\n", text) if p.strip())
    if not docs:
        raise ValueError(f"data.text_files: {[str(p) for p in paths]} hold no text")
    return docs


def split_documents(docs: Sequence[bytes], val_fraction: float) -> tuple[list, list]:
    """(train, val) by a hash of each document; val is never empty when ``val_fraction > 0``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    cut = int(round(val_fraction * 10_000))
    train, val = [], []
    for d in docs:
        (val if zlib.crc32(d) % 10_000 < cut else train).append(d)
    if cut and not val:
        val.append(train.pop())
    if not train:
        raise ValueError(
            f"no training documents left after holding out val_fraction={val_fraction}"
        )
    return train, val


class PackedRows(grain.MapDataset):
    """Concat-then-split packing of a document ``MapDataset`` into ``seq_len`` rows.

    The parent yields ``bytes`` documents (in the order they are packed; shuffle the parent to
    shuffle documents). Row ``r`` covers stream positions ``[r·T, r·T + T]``; see the module
    docstring for the fields. The stream is built on first access.
    """

    def __init__(self, parent: grain.MapDataset, seq_len: int):
        super().__init__(parent)
        if seq_len <= 1:
            raise ValueError(f"seq_len must be > 1; got {seq_len}")
        self._docs = parent
        self._t = seq_len
        self._stream: tuple[np.ndarray, np.ndarray] | None = None

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stream is None:
            toks, segs = [], []
            for i in range(len(self._docs)):
                d = np.frombuffer(self._docs[i], np.uint8).astype(np.int32)
                toks.append(np.concatenate([[BOS], d]).astype(np.int32))
                segs.append(np.full(d.size + 1, i + 1, np.int32))
            self._stream = (np.concatenate(toks), np.concatenate(segs))
        return self._stream

    def __len__(self) -> int:
        toks, _ = self._build()
        return max(1, math.ceil((toks.size - 1) / self._t))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        toks, segs = self._build()
        r = int(index) % len(self)
        t = self._t
        lo = r * t
        row = np.zeros(t + 1, np.int32)
        seg = np.zeros(t + 1, np.int32)
        chunk = toks[lo : lo + t + 1]
        row[: chunk.size] = chunk
        seg[: chunk.size] = segs[lo : lo + t + 1]
        # Renumber the documents of this row 1, 2, ... (padding stays 0).
        first = seg[seg > 0].min() if np.any(seg > 0) else 1
        seg = np.where(seg > 0, seg - first + 1, 0).astype(np.int32)
        mask = ((seg[1:] == seg[:-1]) & (seg[1:] > 0)).astype(np.float32)
        return {
            "tokens": row[:-1],
            "targets": row[1:],
            "mask": mask,
            "segment_ids": seg[:-1],
            "index": np.int64(index),
        }

    def __str__(self) -> str:
        return f"PackedRows(seq_len={self._t})"


def text_datasets(
    files: Sequence[str | Path], seq_len: int, val_fraction: float, seed: int
) -> tuple[grain.MapDataset, grain.MapDataset, dict[str, Any]]:
    """(train rows, val rows, info). Train documents are shuffled by ``seed`` before packing."""
    docs = load_documents(files)
    train_docs, val_docs = split_documents(docs, val_fraction)
    train = PackedRows(grain.MapDataset.source(train_docs).shuffle(seed=seed), seq_len)
    val = PackedRows(grain.MapDataset.source(val_docs or train_docs[:1]), seq_len)
    info = {
        "documents": len(docs),
        "train_bytes": int(sum(len(d) for d in train_docs)),
        "val_bytes": int(sum(len(d) for d in val_docs)),
        "train_rows": len(train),
        "val_rows": len(val),
    }
    return train, val, info


# --------------------------------------------------------------------------------------------
# Per-process batching with a checkpointable position
# --------------------------------------------------------------------------------------------


class ProcessBatches:
    """Endless batches of this process's rows of every global batch of a global dataset.

    ``dataset`` is a random-access grain ``MapDataset`` of examples in global order (shuffled
    and repeated by the caller). Global batch ``s`` is examples ``[s·G, (s+1)·G)``; this process
    reads its rows ``[row_start, row_start + row_count)`` of it (by default process ``p`` of
    ``P`` reads rows ``[p·G/P, (p+1)·G/P)``; ``train.loop`` passes the rows its devices hold).
    ``get_state()`` / ``set_state()`` save and restore the position (grain's iterator state);
    ``next(self)`` returns a dict of ``[row_count, ...]`` arrays.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        global_batch: int,
        rows: tuple[int, int] | None = None,
        num_threads: int = 2,
    ):
        row_start, row_count = rows if rows is not None else (0, global_batch)
        if row_count <= 0 or row_start < 0 or row_start + row_count > global_batch:
            raise ValueError(
                f"rows (start={row_start}, count={row_count}) must lie inside the global batch of "
                f"{global_batch}"
            )
        self.global_batch = global_batch
        self.rows = (row_start, row_count)

        def pick(j: int):
            step, k = divmod(int(j), row_count)
            return dataset[step * global_batch + row_start + k]

        steps = len(dataset) // global_batch
        local_ds = grain.MapDataset.range(steps * row_count).map(pick)
        read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * row_count)
        self._iter_ds = local_ds.batch(row_count, drop_remainder=True).to_iter_dataset(read)
        self._it = iter(self._iter_ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return dict(self._it.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._it = iter(self._iter_ds)
        self._it.set_state(dict(state))


def process_rows(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The default block of rows of process ``process_index``: ``(start, count)``."""
    if global_batch % process_count:
        raise ValueError(
            f"batch_size={global_batch} must be divisible by the number of processes "
            f"({process_count})"
        )
    local = global_batch // process_count
    return process_index * local, local


def eval_batches(
    dataset: grain.MapDataset, global_batch: int, rows: tuple[int, int] | None = None
) -> list[dict[str, np.ndarray]]:
    """Every example of a finite ``dataset`` as this process's rows of global batches.

    The last global batch is padded with all-zero examples (mask 0, so they count for nothing).
    """
    row_start, row_count = rows if rows is not None else (0, global_batch)
    n = len(dataset)
    examples = [dataset[i] for i in range(n)]
    pad = (-n) % global_batch
    if pad:
        blank = {k: np.zeros_like(v) for k, v in examples[0].items()}
        examples += [blank] * pad
    out = []
    for s in range(0, len(examples), global_batch):
        chunk = examples[s + row_start : s + row_start + row_count]
        out.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return out
