"""Corpora, tokenizer and packed token streams for the pretraining benchmark.

A corpus is a list of (key, text) documents split train/validation by a hash of each key, so the split
does not depend on file-system order, plus a sha256 "corpus hash" that results carry to name their data.
Tokenizers and token streams are cached under --cache-dir keyed by that hash.
"""

import hashlib
import json
import os
import socket
import sysconfig
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
import torch

BOS, EOS = "<s>", "</s>"  # ids 0 and 1 in the trained tokenizer, matching the configs' bos/eos ids
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ".c", ".h"}
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Corpus:
    name: str
    train: list = field(repr=False)  # list of document texts
    val: list = field(repr=False)
    hash: str = ""
    num_files: int = 0

    def describe(self):
        return {
            "name": self.name,
            "hash": self.hash,
            "files": self.num_files,
            "train_docs": len(self.train),
            "val_docs": len(self.val),
            "train_chars": sum(map(len, self.train)),
            "val_chars": sum(map(len, self.val)),
        }


def _is_val(key, val_fraction):
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def _make_corpus(name, docs, val_fraction, num_files):
    """docs: list of (key, text). Sorted by key, hashed, split by key hash."""
    docs = sorted(docs)
    sha = hashlib.sha256()
    for key, text in docs:
        sha.update(key.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    val_mask = [_is_val(k, val_fraction) for k, _ in docs]
    if not any(val_mask) and len(docs) > 1:  # tiny corpora: still hold one document out
        val_mask[min(range(len(docs)), key=lambda i: hashlib.sha256(docs[i][0].encode()).digest())] = True
    train = [t for (_, t), v in zip(docs, val_mask) if not v and t]
    val = [t for (_, t), v in zip(docs, val_mask) if v and t]
    if not train or not val:
        raise ValueError(f"corpus {name!r} is too small to split into train and validation ({len(docs)} documents)")
    return Corpus(name, train, val, sha.hexdigest(), num_files)


def _read_text(path):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def stdlib_corpus(val_fraction=0.05):
    """The standard library's *.py source (no site-packages, no test directories), split by file."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                docs.append((os.path.relpath(path, root).replace(os.sep, "/"), _read_text(path)))
    if not docs:
        raise FileNotFoundError(f"no *.py files found under the stdlib path {root}")
    return _make_corpus(f"stdlib:{root}", docs, val_fraction, len(docs))


def _docs_from_file(path, rel, text_field, single):
    if path.endswith(".jsonl"):
        with open(path, "r", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise KeyError(f"{path}:{i + 1} has no field {text_field!r} (use --text-field)")
                    yield f"{rel}:{i}", rec[text_field]
    elif single:  # one text file: its blank-line separated paragraphs are the documents
        for i, para in enumerate(_read_text(path).split("\n\n")):
            if para.strip():
                yield f"{rel}:{i}", para + "\n\n"
    else:
        yield rel, _read_text(path)


def local_corpus(path, text_field="text", val_fraction=0.05):
    """A text file, a .jsonl file (field `text_field`), or a directory of those (recursively)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        files = [(path, os.path.basename(path))]
    elif os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if os.path.splitext(fn)[1].lower() in TEXT_SUFFIXES:
                    full = os.path.join(dirpath, fn)
                    files.append((full, os.path.relpath(full, path).replace(os.sep, "/")))
    else:
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"--data {path}: no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    single = len(files) == 1
    docs = [d for full, rel in files for d in _docs_from_file(full, rel, text_field, single)]
    return _make_corpus(f"local:{path}", docs, val_fraction, len(files))


def hub_unreachable_reason(timeout=5.0):
    """None if the Hugging Face hub looks reachable, else why not; fast (datasets itself retries ~25 s+)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlparse(proxy or endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e})"
    return None


def hf_corpus(spec, text_field="text", val_fraction=0.05, max_chars=None):
    """`hf:NAME[:CONFIG]`: the train split streamed with `datasets`, up to `max_chars` characters.
    Streamed data cannot be hashed as a whole, so the hash covers the documents actually taken."""
    name, _, config = spec[len("hf:") :].partition(":")
    reason = hub_unreachable_reason()
    if reason:
        raise ConnectionError(
            f"--data {spec}: the Hugging Face hub is unreachable ({reason}), so dataset {name!r} "
            "cannot be streamed; use --data stdlib or a local path instead"
        )
    import datasets

    stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    docs, total = [], 0
    for i, rec in enumerate(stream):
        docs.append((f"{i:012d}", rec[text_field]))
        total += len(rec[text_field])
        if max_chars is not None and total >= max_chars:
            break
    return _make_corpus(spec, docs, val_fraction, 0)


def load_corpus(spec="stdlib", text_field="text", val_fraction=0.05, max_chars=None):
    if spec == "stdlib":
        return stdlib_corpus(val_fraction)
    if spec.startswith("hf:"):
        return hf_corpus(spec, text_field, val_fraction, max_chars)
    return local_corpus(spec, text_field, val_fraction)


# ---------------------------------------------------------------- tokenizer


@dataclass
class Tokenizer:
    """Common face of a trained `tokenizers.Tokenizer` and a HF `transformers` tokenizer."""

    name: str
    encode_batch: object  # list[str] -> list[list[int]]
    vocab_size: int
    eos_id: int
    id: str  # hash of the vocabulary/merges: keys the token cache


def _atomic_write(path, write):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def train_bpe(corpus, vocab_size, cache_dir, max_train_mb=16):
    """Byte-level BPE trained on the first `max_train_mb` MB of the training split, cached on disk."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path = os.path.join(cache_dir, "tokenizers", f"bpe-{corpus.hash[:16]}-v{vocab_size}-mb{max_train_mb:g}.json")
    if not os.path.exists(path):
        t0 = time.time()
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS, EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        budget, texts = int(max_train_mb * 2**20), []
        for text in corpus.train:  # cap the training text so the default stays minutes on 2 CPU cores
            texts.append(text[:budget])
            budget -= len(texts[-1])
            if budget <= 0:
                break
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        _atomic_write(path, tok.save)
        print(f"trained BPE tokenizer (vocab {vocab_size}) in {time.time() - t0:.1f}s -> {path}", flush=True)
    tok = HFTok.from_file(path)
    ident = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    return Tokenizer(f"bpe{vocab_size}", encode, tok.get_vocab_size(), tok.token_to_id(EOS), ident)


def hf_tokenizer(name):
    from transformers import AutoTokenizer

    try:  # local files first: from_pretrained would otherwise retry an unreachable hub for a long time
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        reason = hub_unreachable_reason()
        if reason:
            raise OSError(
                f"--tokenizer {name}: not a local path or in the HF cache, and the Hugging Face hub "
                f"is unreachable ({reason})"
            ) from None
        tok = AutoTokenizer.from_pretrained(name)
    ident = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
    encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return Tokenizer(name, encode, len(tok), eos, ident)


# ---------------------------------------------------------------- token streams and batches


def tokenize_cached(corpus, tokenizer, cache_dir, chunk=256):
    """(train, val) 1-D numpy token streams, documents joined by EOS; cached as .npy by corpus+tokenizer."""
    base = os.path.join(cache_dir, "tokens", f"{corpus.hash[:16]}-{tokenizer.id}")
    out = []
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        path = f"{base}.{split}.npy"
        if not os.path.exists(path):
            dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
            parts = []
            for i in range(0, len(docs), chunk):
                for ids in tokenizer.encode_batch(docs[i : i + chunk]):
                    parts.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
            arr = np.concatenate(parts) if parts else np.zeros(0, dtype)
            _atomic_write(path, lambda p, arr=arr: _save_npy(p, arr))
        out.append(np.load(path, mmap_mode="r"))
    return tuple(out)


def _save_npy(path, arr):
    with open(path, "wb") as f:  # a file object, because np.save(name) would append ".npy" to the tmp name
        np.save(f, arr)


def pack(tokens, seq_len):
    """Fixed-length blocks [num_blocks, seq_len] (the tail that does not fill a block is dropped)."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ValueError(f"only {len(tokens)} tokens, fewer than one --seq-len {seq_len} block")
    return torch.from_numpy(np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len))


class BlockSampler:
    """Deterministic sample order: global sample g is block perm_e[g % N] of epoch e = g // N, with
    perm_e drawn from (seed, e). Batches are addressed by sample position, so a checkpoint needs only
    the position, and a rank's shard is a fixed slice of each global batch."""

    def __init__(self, num_blocks, seed):
        self.n, self.seed, self._perm = num_blocks, seed, (None, None)

    def _epoch_perm(self, e):
        if self._perm[0] != e:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perm = (e, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def indices(self, start, count):
        return torch.stack([self._epoch_perm(g // self.n)[g % self.n] for g in range(start, start + count)])
