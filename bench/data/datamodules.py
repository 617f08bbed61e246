"""Lightning data modules for the two task types.

LM: the corpus is tokenized once and the ids cached as ``.npy`` under the cache dir. Training
draws random contiguous blocks of ``seq_len + 1`` tokens (x = block[:-1], y = block[1:]) from a
seeded sampler; there are no real epochs (an "epoch" is just a re-seed after about one pass worth
of tokens) because runs stop on a compute budget. Val/test walk non-overlapping blocks in order.

Translation: (source, target) sentence pairs, truncated to ``src_len`` / ``tgt_len``, padded per
batch; training batches group sentences of similar length (less padding), seeded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.data.sources import Corpus, atomic_open, cache_dir, resolve_corpus
from bench.data.tasks import TaskConfig, load_task
from bench.data.text import lm_text, parallel_lines, split_documents
from bench.data.tokenizers import Tokenizer, get_tokenizer, tokenizer_key


def _as_task(task: TaskConfig | str) -> TaskConfig:
    return load_task(task) if isinstance(task, (str, os.PathLike)) else task


def _seed_for(seed: int, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, epoch).
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


# --------------------------------------------------------------------------- LM pieces


def encoded_ids(task: TaskConfig, corpus: Corpus, tok: Tokenizer, split: str,
                cache: str | Path | None = None) -> np.ndarray:
    """Token ids of an LM split, cached as .npy keyed by tokenizer + data (memory-mapped on load)."""
    spec = getattr(task.splits, split)
    docs = split_documents(task, corpus)[split]
    # One file: the key of the cache entries written before splits could read several files.
    data = ({"file": docs[0], "sha": corpus.sha256[docs[0]]} if len(docs) == 1
            else {"files": [[d, corpus.sha256[d]] for d in docs]})
    blob = json.dumps({"tok": tokenizer_key(task, corpus), **data, "range": [spec.start, spec.end],
                       "format": task.corpus.format}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = cache_dir(cache) / "encoded" / f"{Path(task.corpus.dir).name}-{split}-{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # truncated/unreadable: re-encode and overwrite
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    ids = np.asarray(tok.encode(lm_text(task, corpus, split)), dtype=dtype)
    with atomic_open(path) as f:  # concurrent runs never read a half-written array
        np.save(f, ids)
    return ids


class BlockDataset(Dataset):
    """Index = start position; item = (x, y) with x = ids[s:s+T], y = ids[s+1:s+T+1]."""

    def __init__(self, ids: np.ndarray, seq_len: int):
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return max(0, len(self.ids) - self.seq_len)  # number of valid start positions

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = torch.from_numpy(np.asarray(self.ids[start:start + self.seq_len + 1], dtype=np.int64))
        return block[:-1], block[1:]


class RandomBlockSampler(Sampler[int]):
    """``num_samples`` uniform random start positions per epoch, from a seeded generator.

    Deterministic given (seed, epoch); Lightning calls ``set_epoch`` before each epoch.
    """

    def __init__(self, num_starts: int, num_samples: int, seed: int = 0):
        self.num_starts, self.num_samples, self.seed, self.epoch = num_starts, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
        left = self.num_samples
        while left > 0:  # chunks keep memory flat for huge "epochs"
            n = min(left, 1 << 16)
            yield from torch.randint(self.num_starts, (n,), generator=g).tolist()
            left -= n


def unigram_baseline_loss(train_ids: Sequence[int] | np.ndarray, eval_ids: Sequence[int] | np.ndarray,
                          vocab_size: int, alpha: float = 1.0) -> float:
    """Cross-entropy (nats/token) on ``eval_ids`` of the add-``alpha`` smoothed unigram
    distribution of ``train_ids``: the loss of a model that ignores context. A trained LM should
    be well below it; smoothing keeps tokens unseen in training from making it infinite."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64) + alpha
    logp = np.log(counts / counts.sum())
    eval_counts = np.bincount(np.asarray(eval_ids, dtype=np.int64), minlength=vocab_size)
    return float(-(eval_counts * logp).sum() / max(1, eval_counts.sum()))


class _TaskDataModule(pl.LightningDataModule):
    def __init__(self, task: TaskConfig | str, data_dir: str | Path | None, batch_size: int,
                 num_workers: int, seed: int, cache: str | Path | None, allow_download: bool | None):
        super().__init__()
        self.task = _as_task(task)
        self.data_dir, self.batch_size, self.num_workers, self.seed = data_dir, batch_size, num_workers, seed
        self.eval_batch_size = batch_size  # evaluation only; any size gives the same metrics
        self.cache, self.allow_download = cache, allow_download
        self.corpus: Corpus | None = None
        self.tokenizer: Tokenizer | None = None

    @property
    def vocab_size(self) -> int:
        if self.task.vocab_size is None:  # derived from the data: the tokenizer's size
            self._resolve()
            return self.tokenizer.vocab_size
        return self.task.vocab_size

    def _resolve(self) -> None:
        if self.corpus is None:
            self.corpus = resolve_corpus(self.task, self.data_dir, cache=self.cache,
                                         allow_download=self.allow_download)
            self.tokenizer = get_tokenizer(self.task, self.corpus, self.cache)

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def _loader(self, dataset, **kw) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), **kw)

    def _ensure_setup(self) -> None:
        # Lightning calls setup(); this makes the loaders usable directly (scripts, tests) too.
        if self.tokenizer is None or not self._ready():
            self.setup()

    def _ready(self) -> bool:
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if not self.task.has_split(split):
            raise RuntimeError(f"task {self.task.name!r} has no {split} split (see splits in its YAML file)")


class LMDataModule(_TaskDataModule):
    """Batches are ``(x, y)``, both int64 ``(batch_size, seq_len)``, y = x shifted by one."""

    def __init__(self, task: TaskConfig | str, data_dir: str | Path | None = None, batch_size: int = 32,
                 seq_len: int | None = None, num_workers: int = 0, seed: int = 0,
                 cache: str | Path | None = None, samples_per_epoch: int | None = None,
                 allow_download: bool | None = None):
        super().__init__(task, data_dir, batch_size, num_workers, seed, cache, allow_download)
        if self.task.type != "lm":
            raise ValueError(f"task {self.task.name!r} has type={self.task.type!r}; LMDataModule needs 'lm'")
        self.seq_len = int(seq_len or self.task.seq_len)
        self.samples_per_epoch = samples_per_epoch
        self.ids: dict[str, np.ndarray] = {}

    def _ready(self) -> bool:
        return "train" in self.ids

    def prepare_data(self) -> None:
        # Rank 0 only: download, train the tokenizer, encode; other ranks then hit the caches.
        self._resolve()
        for split in ("train", "val", "test"):
            if self.task.has_split(split):
                encoded_ids(self.task, self.corpus, self.tokenizer, split, self.cache)

    def setup(self, stage: str | None = None) -> None:
        self._resolve()
        for split in ("train", "val", "test"):
            if self.task.has_split(split) and split not in self.ids:
                self.ids[split] = encoded_ids(self.task, self.corpus, self.tokenizer, split, self.cache)
                if len(self.ids[split]) < self.seq_len + 1:
                    raise ValueError(f"task {self.task.name!r} {split} split has {len(self.ids[split])} tokens, "
                                     f"fewer than one block of seq_len + 1 = {self.seq_len + 1}")

    def train_token_counts(self, vocab_size: int) -> dict[str, torch.Tensor]:
        """{"tokens": occurrences of each id in the training split} (frequency hash tables)."""
        self._ensure_setup()
        return {"tokens": torch.from_numpy(np.bincount(self.ids["train"], minlength=vocab_size)[:vocab_size])}

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        ds = BlockDataset(self.ids["train"], self.seq_len)
        n = self.samples_per_epoch or max(self.batch_size, (len(self.ids["train"]) - 1) // self.seq_len)
        sampler = RandomBlockSampler(len(ds), n, self.seed + self._rank())  # DDP: each rank its own blocks
        return self._loader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        self._check_split(split)
        self._ensure_setup()
        ds = BlockDataset(self.ids[split], self.seq_len)
        # Non-overlapping blocks: every token after the first is predicted exactly once (the
        # incomplete tail block is dropped).
        return self._loader(ds, batch_size=self.eval_batch_size, sampler=range(0, len(ds), self.seq_len))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def unigram_baseline_loss(self, split: str = "val", alpha: float = 1.0) -> float:
        """Cross-entropy of the training unigram distribution on ``split`` (see module function)."""
        self._ensure_setup()
        return unigram_baseline_loss(self.ids["train"], self.ids[split], self.tokenizer.vocab_size, alpha)


# --------------------------------------------------------------------------- translation pieces


class PairDataset(Dataset):
    """Encoded (src, tgt) pairs stored flat (ids + offsets) so millions of pairs stay compact.

    src = tokens[:src_len - 1] + <eos>;  tgt = <bos> + tokens[:tgt_len - 1] + <eos>, from which
    collate takes tgt_in = tgt[:-1] and tgt_out = tgt[1:] (each at most tgt_len long).
    """

    def __init__(self, src: list[list[int]], tgt: list[list[int]]):
        self.src_ids, self.src_off = _flatten(src)
        self.tgt_ids, self.tgt_off = _flatten(tgt)

    def __len__(self) -> int:
        return len(self.src_off) - 1

    def lengths(self) -> np.ndarray:
        return np.maximum(np.diff(self.src_off), np.diff(self.tgt_off) - 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.src_ids[self.src_off[i]:self.src_off[i + 1]]
        t = self.tgt_ids[self.tgt_off[i]:self.tgt_off[i + 1]]
        return torch.from_numpy(s.astype(np.int64)), torch.from_numpy(t.astype(np.int64))


def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(off[-1]))
    return flat, off


def encode_pairs(tok: Tokenizer, src: list[str], tgt: list[str], src_len: int, tgt_len: int,
                 chunk: int = 10_000) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize and truncate; <eos> ends the source, <bos>...<eos> wraps the target."""
    bos, eos = tok.bos_id, tok.eos_id
    out_src, out_tgt = [], []
    for i in range(0, len(src), chunk):  # chunks bound the memory of the HF encodings
        for ids in tok.encode_batch(src[i:i + chunk]):
            out_src.append(ids[:src_len - 1] + [eos])
        for ids in tok.encode_batch(tgt[i:i + chunk]):
            out_tgt.append([bos] + ids[:tgt_len - 1] + [eos])
    return out_src, out_tgt


def collate_pairs(batch: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of (src, tgt) to dict(src, src_mask, tgt_in, tgt_out, tgt_mask).

    Masks are bool, True = real token; they come from lengths (not ``!= pad_id``) so they are right
    whatever the ids. Padded positions of tgt_out hold pad_id: use it as the loss ignore_index.
    """
    b = len(batch)
    S = max(len(s) for s, _ in batch)
    T = max(len(t) for _, t in batch) - 1
    src = torch.full((b, S), pad_id, dtype=torch.long)
    tgt_in = torch.full((b, T), pad_id, dtype=torch.long)
    tgt_out = torch.full((b, T), pad_id, dtype=torch.long)
    src_mask = torch.zeros((b, S), dtype=torch.bool)
    tgt_mask = torch.zeros((b, T), dtype=torch.bool)
    for i, (s, t) in enumerate(batch):
        src[i, :len(s)], src_mask[i, :len(s)] = s, True
        n = len(t) - 1
        tgt_in[i, :n], tgt_out[i, :n], tgt_mask[i, :n] = t[:-1], t[1:], True
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out, "tgt_mask": tgt_mask}


class _Collate:
    """Picklable collate (worker processes under spawn need it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate_pairs(batch, self.pad_id)


class _EpochHook:
    """Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``,
    never on the batch sampler itself: this is the ``.sampler`` that forwards it."""

    def __init__(self, owner: "BucketBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Seeded length-bucketed batches: shuffle, sort within pools of ``pool`` batches by length,
    cut into batches, shuffle the batch order. Similar lengths -> little padding; still random.

    A new order every epoch. Translation training cuts epochs at ``eval_every`` batches, so
    without Lightning's ``set_epoch`` reaching this sampler every "epoch" replayed the same first
    batches (e.g. 1,600 of Multi30k's 29,000 pairs) and the model overfit them."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.pool, self.epoch = batch_size, seed, pool, 0
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        size = self.batch_size * self.pool
        batches = []
        for i in range(0, len(perm), size):
            chunk = perm[i:i + size]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[j:j + self.batch_size].tolist() for j in range(0, len(chunk), self.batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[k] for k in order]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.pool
        full, rest = divmod(n, size)
        return full * self.pool + math.ceil(rest / self.batch_size)


class TranslationDataModule(_TaskDataModule):
    """Batches are dicts: src, src_mask, tgt_in, tgt_out, tgt_mask (see ``collate_pairs``).

    ``references(split)`` / ``sources(split)`` give the raw sentences of val/test in loader order,
    for BLEU on detokenized output (``tokenizer.decode``).
    """

    def __init__(self, task: TaskConfig | str, data_dir: str | Path | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, cache: str | Path | None = None,
                 src_len: int | None = None, tgt_len: int | None = None, allow_download: bool | None = None):
        super().__init__(task, data_dir, batch_size, num_workers, seed, cache, allow_download)
        if self.task.type != "translation":
            raise ValueError(f"task {self.task.name!r} has type={self.task.type!r}; "
                             "TranslationDataModule needs 'translation'")
        self.src_len = int(src_len or self.task.src_len)
        self.tgt_len = int(tgt_len or self.task.tgt_len)
        self.datasets: dict[str, PairDataset] = {}
        self.raw: dict[str, tuple[list[str], list[str]]] = {}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def _ready(self) -> bool:
        return "train" in self.datasets

    def prepare_data(self) -> None:
        self._resolve()  # download + train/cache the tokenizer once (rank 0)

    def setup(self, stage: str | None = None) -> None:
        self._resolve()
        for split in ("train", "val", "test"):
            if not self.task.has_split(split) or split in self.datasets:
                continue
            src, tgt = parallel_lines(self.task, self.corpus, split)
            if split == "train":  # an empty side teaches nothing; eval keeps every pair for BLEU
                keep = [i for i in range(len(src)) if src[i].strip() and tgt[i].strip()]
                src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
            else:
                self.raw[split] = (src, tgt)
            self.datasets[split] = PairDataset(*encode_pairs(self.tokenizer, src, tgt, self.src_len, self.tgt_len))

    def train_token_counts(self, vocab_size: int) -> dict[str, torch.Tensor]:
        """Occurrences of each id in the training pairs as the model reads them: "src" (the
        encoder's input) and "tgt" (the decoder's input, <bos> + target, without the final <eos>)."""
        self._ensure_setup()
        ds = self.datasets["train"]
        decoder_in = np.ones(len(ds.tgt_ids), dtype=bool)
        decoder_in[ds.tgt_off[1:] - 1] = False  # each target's last token is only ever predicted
        return {"src": torch.from_numpy(np.bincount(ds.src_ids, minlength=vocab_size)[:vocab_size]),
                "tgt": torch.from_numpy(np.bincount(ds.tgt_ids[decoder_in], minlength=vocab_size)[:vocab_size])}

    def references(self, split: str = "val") -> list[str]:
        self._check_split(split)
        self._ensure_setup()
        return self.raw[split][1]

    def sources(self, split: str = "val") -> list[str]:
        self._check_split(split)
        self._ensure_setup()
        return self.raw[split][0]

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        ds = self.datasets["train"]
        sampler = BucketBatchSampler(ds.lengths(), self.batch_size, self.seed + self._rank())
        return self._loader(ds, batch_sampler=sampler, collate_fn=_Collate(self.pad_id))

    def _eval_loader(self, split: str) -> DataLoader:
        self._check_split(split)
        self._ensure_setup()
        return self._loader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                            collate_fn=_Collate(self.pad_id))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def build_datamodule(task: TaskConfig | str, **kwargs: Any) -> pl.LightningDataModule:
    """The data module for ``task.type``: LMDataModule or TranslationDataModule."""
    task = _as_task(task)
    cls = LMDataModule if task.type == "lm" else TranslationDataModule
    return cls(task, **kwargs)
