"""Real text for the reference trainer: a byte-level BPE trained offline, token files, batches.

``prepare(cfg.data)`` reads ``{corpus}.train.txt.xz`` / ``{corpus}.val.txt.xz`` (stdlib
``lzma``), trains a byte-level BPE with the ``tokenizers`` package on the train text and
writes the tokenizer and the encoded uint16 (uint32 above 65535) token files into a cache
folder keyed by the corpus files' sha256 and the vocab size. Later runs only memory-map them.
Under torchrun the first rank builds and the others wait at a barrier; files are written
to a temporary name and renamed, so a crashed build leaves nothing half-written.

Batches are a pure function of ``(seed, step, micro step)``: the *global* batch of a step is
drawn from one generator and each data-parallel rank takes its slice. The same step gives
the same global batch at any world size, and resuming needs no data-loader state.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"


def default_data_dir() -> Path:
    env = os.environ.get("DIST_STAB_DATA")
    if env:
        return Path(env)
    for cand in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                 Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return REPO_ROOT.parent / "shared" / "data"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIST_STAB_CACHE", REPO_ROOT / ".data"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: Path, max_chars: Optional[int] = None) -> str:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return f.read(max_chars) if max_chars else f.read()


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    # cut at newlines so that BPE pre-tokenization sees whole words
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return tok


def encode(tok, text: str, dtype) -> np.ndarray:
    pieces = [np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(list(_chunks(text)))]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


@dataclass
class TokenData:
    cache: Path
    tokenizer_path: Path
    vocab_size: int  # actual vocabulary of the trained tokenizer (<= requested)
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.tokenizer_path))


def _dist_info() -> Tuple[int, bool]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), True
    return 0, False


def cache_key(train_path: Path, val_path: Path, vocab_size: int, max_chars: Optional[int]) -> str:
    sha = hashlib.sha256((_sha256_file(train_path) + _sha256_file(val_path)).encode()).hexdigest()[:16]
    return f"{train_path.name.split('.')[0]}-{sha}-v{vocab_size}" + (f"-c{max_chars}" if max_chars else "")


def build(train_path: Path, val_path: Path, cache: Path, vocab_size: int, max_chars: Optional[int]) -> None:
    """Train the tokenizer and write the token files into ``cache`` (atomic renames)."""
    cache.mkdir(parents=True, exist_ok=True)
    text = read_text(train_path, max_chars)
    tok = train_tokenizer(text, vocab_size)
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
    tmp = f".tmp{os.getpid()}"
    tok.save(str(cache / ("tokenizer.json" + tmp)))
    for split, src in (("train", text), ("val", read_text(val_path, max_chars))):
        ids = encode(tok, src, dtype)
        ids.tofile(cache / f"{split}.bin{tmp}")
    meta = {"vocab_size": tok.get_vocab_size(), "dtype": np.dtype(dtype).name,
            "train_file": str(train_path), "val_file": str(val_path), "max_chars": max_chars}
    (cache / ("meta.json" + tmp)).write_text(json.dumps(meta, indent=1))
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):  # meta.json last: marks completion
        os.replace(cache / (name + tmp), cache / name)


def prepare(cfg, log=print) -> TokenData:
    data_dir = Path(cfg.dir) if cfg.dir else default_data_dir()
    train_path = data_dir / f"{cfg.corpus}.train.txt.xz"
    val_path = data_dir / f"{cfg.corpus}.val.txt.xz"
    for p in (train_path, val_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found; set data.dir or $DIST_STAB_DATA to the folder with the corpus")
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache = cache_root / cache_key(train_path, val_path, cfg.vocab_size, cfg.max_train_chars)
    rank, distributed = _dist_info()
    if rank == 0 and not (cache / "meta.json").exists():
        import time
        t0 = time.time()
        log(f"data: training a byte-level BPE (vocab {cfg.vocab_size}) on {train_path.name} -> {cache}")
        build(train_path, val_path, cache, cfg.vocab_size, cfg.max_train_chars)
        log(f"data: tokenizer and token files ready in {time.time() - t0:.1f}s")
    if distributed:
        import torch.distributed as dist
        dist.barrier()
    meta = json.loads((cache / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r")
    return TokenData(cache, cache / "tokenizer.json", int(meta["vocab_size"]), train, val)


class Batches:
    """Random windows of ``seq_len + 1`` tokens; the global batch of a step is world-size independent."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len + 1}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def _windows(self, starts: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, micro: int, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int):
        """This rank's rows of micro step ``micro`` of step ``step``'s global batch.

        The global batch (``global_batch`` windows) is drawn once per step; micro step ``j`` of
        rank ``r`` takes rows ``j*micro_batch*dp_size + r*micro_batch + [0, micro_batch)``, so any
        world size and accumulation split see the same sequences.
        """
        g = np.random.default_rng([self.seed, step])
        starts = g.integers(0, len(self.tokens) - self.seq_len - 1, size=global_batch)
        lo = micro * micro_batch * dp_size + dp_rank * micro_batch
        return self._windows(starts[lo:lo + micro_batch])

    def eval_batches(self, num_batches: int, global_batch: int, dp_rank: int, dp_size: int):
        """The same evenly spaced windows at every evaluation; each rank takes its slice."""
        n = num_batches * global_batch
        starts = np.linspace(0, len(self.tokens) - self.seq_len - 2, n).astype(np.int64)
        per = global_batch // dp_size
        for b in range(num_batches):
            s = starts[b * global_batch:(b + 1) * global_batch]
            yield self._windows(s[dp_rank * per:(dp_rank + 1) * per])
