"""Precomputed key/value states of every passage's self-check prompt (the self-check's index).

The self-check scores how likely a question is after `SELF_CHECK_PROMPT` filled with a passage, under the base
LLM. That prompt does not depend on the question, so its KV states can be computed once per passage, as the
docid tree is built once per corpus. A self-check then runs only the question's tokens over the cached states
of its N candidates: a few dozen token positions instead of N whole passages.

Layout of a cache folder (under `cache_dir()/passage_kv/<key>`, the key hashing everything it depends on):
  meta.json          fingerprint, doc ids, token offsets and lengths, shapes, `complete`
  kv.bin             float16 (or float32) memmap [tokens, layers, 2 (K, V), kv_heads, head_dim]
  last_hidden.bin    float32 memmap [docs, hidden]: the final hidden state at each prompt's last position
  done.npy           which documents are written: an interrupted build resumes where it stopped
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unirag.errors import UniragError
from unirag.joint.modeling import JointModel
from unirag.joint.prompts import SELF_CHECK_PROMPT, question_ids, self_check_prompt_ids
from unirag.paths import write_json_atomic

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _precision(model: JointModel) -> str:
    from unirag.quantization import weight_format

    return weight_format(model.causal_lm)


def cache_fingerprint(model: JointModel, corpus) -> dict[str, Any]:
    """What the cached states depend on: corpus, base LLM, its precision, the prompt and the tokenizer."""
    from unirag.backbones import llm_fingerprint

    tokenizer = model.tokenizer
    return {
        "format": FORMAT_VERSION,
        "corpus": corpus.fingerprint,
        "base": llm_fingerprint(model.config.base_model),
        "precision": _precision(model),
        "prompt": SELF_CHECK_PROMPT,
        "tokenizer": f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.name_or_path}",
    }


def default_cache_path(model: JointModel, corpus) -> Path:
    from unirag.paths import cache_dir

    key = hashlib.sha256(json.dumps(cache_fingerprint(model, corpus), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "passage_kv" / key


def _kv_shape(model: JointModel) -> tuple[int, int, int]:
    config = model.base_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(model.decoder.layers), kv_heads, head_dim


class PassageCache:
    """The self-check prompt's KV states for every passage of a corpus, on disk (memory-mapped)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.doc_ids: list[str] = meta["doc_ids"]
        self.row = {doc_id: i for i, doc_id in enumerate(self.doc_ids)}
        self.offsets = np.asarray(meta["offsets"], dtype=np.int64)
        self.lengths = np.asarray(meta["lengths"], dtype=np.int64)
        layers, kv_heads, head_dim = meta["layers"], meta["kv_heads"], meta["head_dim"]
        tokens = int(self.lengths.sum())
        mode = "r" if meta.get("complete") else "r+"
        self.kv = np.memmap(path / "kv.bin", dtype=STORAGE_DTYPES[meta["storage_dtype"]], mode=mode,
                            shape=(max(tokens, 1), layers, 2, kv_heads, head_dim))
        self.last_hidden = np.memmap(path / "last_hidden.bin", dtype=np.float32, mode=mode,
                                     shape=(max(len(self.doc_ids), 1), meta["hidden"]))

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def nbytes(self) -> int:
        return int(self.kv.nbytes + self.last_hidden.nbytes)

    # ------------------------------------------------------------------------------------------ build / open

    @classmethod
    def open(cls, model: JointModel, corpus, path: str | Path | None = None) -> PassageCache:
        """A complete cache built for this model and corpus; a clear error otherwise."""
        path = Path(path) if path is not None else default_cache_path(model, corpus)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise UniragError(f"No self-check cache at {path}: build it with `python -m unirag index --corpus ... "
                              "--self-check-cache` (same --llm/--precision as the run that uses it).")
        meta = json.loads(meta_path.read_text())
        expected = cache_fingerprint(model, corpus)
        if meta.get("fingerprint") != expected:
            diff = sorted(k for k in expected if meta.get("fingerprint", {}).get(k) != expected[k])
            raise UniragError(f"The self-check cache {path} was built for another {', '.join(diff)}; rebuild it.")
        if not meta.get("complete"):
            raise UniragError(f"The self-check cache {path} is incomplete (an interrupted build): run the build "
                              "again to resume it.")
        _check_sizes(path, meta)
        return cls(path, meta)

    @classmethod
    def find(cls, model: JointModel, corpus) -> PassageCache | None:
        """The complete cache at the default path for this model and corpus, or None (missing, partial, stale)."""
        try:
            return cls.open(model, corpus)
        except UniragError:
            return None

    @classmethod
    def build(cls, model: JointModel, corpus, path: str | Path | None = None, batch_size: int = 8,
              storage_dtype: str = "float16", progress: bool = True) -> PassageCache:
        """Compute (or resume computing) the cache; returns it complete. Documents go through the base LLM in
        right-padded batches of similar length (causal attention: the padding never reaches a row's tokens).
        One process builds a cache at a time (a lock file); a second one gets a clear error."""
        if storage_dtype not in STORAGE_DTYPES:
            raise UniragError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
        if batch_size < 1:
            raise UniragError("batch_size must be >= 1.")
        path = Path(path) if path is not None else default_cache_path(model, corpus)
        path.mkdir(parents=True, exist_ok=True)
        with _exclusive(path / ".lock"):
            return cls._build(model, corpus, path, batch_size, storage_dtype, progress)

    @classmethod
    @torch.inference_mode()
    def _build(cls, model: JointModel, corpus, path: Path, batch_size: int, storage_dtype: str,
               progress: bool) -> PassageCache:
        from tqdm.auto import tqdm

        fingerprint = cache_fingerprint(model, corpus)
        meta_path = path / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") != fingerprint or meta.get("storage_dtype") != storage_dtype:
                raise UniragError(f"{path} holds a self-check cache for another model, corpus or storage dtype; "
                                  "choose another path or delete it.")
            if meta.get("complete"):
                return cls.open(model, corpus, path)
            _check_sizes(path, meta)
        else:
            tokenizer = model.tokenizer
            prompts = [self_check_prompt_ids(tokenizer, p.title, p.text) for p in corpus]
            lengths = [len(p) for p in prompts]
            layers, kv_heads, head_dim = _kv_shape(model)
            meta = {
                "fingerprint": fingerprint,
                "storage_dtype": storage_dtype,
                "doc_ids": list(corpus.ids),
                "lengths": lengths,
                "offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if lengths else [],
                "layers": layers,
                "kv_heads": kv_heads,
                "head_dim": head_dim,
                "hidden": int(model.base_config.hidden_size),
                "complete": False,
            }
            tokens = max(sum(lengths), 1)
            np.memmap(path / "kv.bin", dtype=STORAGE_DTYPES[storage_dtype], mode="w+",
                      shape=(tokens, layers, 2, kv_heads, head_dim)).flush()
            np.memmap(path / "last_hidden.bin", dtype=np.float32, mode="w+",
                      shape=(max(len(lengths), 1), meta["hidden"])).flush()
            np.save(path / "done.npy", np.zeros(len(lengths), dtype=bool))
            write_json_atomic(meta_path, meta)
        cache = cls(path, meta)
        done = np.load(path / "done.npy")
        todo = [i for i in np.argsort(cache.lengths, kind="stable") if not done[i]]
        tokenizer = model.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        device = model.device
        bar = tqdm(total=len(done), initial=int(done.sum()), desc="self-check cache", unit="doc", disable=not progress)
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            prompts = [self_check_prompt_ids(tokenizer, corpus[cache.doc_ids[i]].title, corpus[cache.doc_ids[i]].text)
                       for i in rows]
            for i, p in zip(rows, prompts, strict=True):
                if len(p) != cache.lengths[i]:
                    raise UniragError(f"The tokenizer now gives {len(p)} tokens for {cache.doc_ids[i]} where the "
                                      f"cache planned {cache.lengths[i]}; delete {path} and rebuild.")
            width = max(len(p) for p in prompts)
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
            with model.reading_mode(adapter=False):
                out = model(ids, attention_mask=mask, use_cache=True, pathway=False, bridge=False,
                            return_lm_logits=False)
            layers = out.past_key_values.layers[: cache.meta["layers"]]
            for b, (i, p) in enumerate(zip(rows, prompts, strict=True)):
                n, off = len(p), int(cache.offsets[i])
                # [layers, 2, kv_heads, n, head_dim] -> token-major [n, layers, 2, kv_heads, head_dim]
                kv = torch.stack([torch.stack([layer.keys[b, :, :n], layer.values[b, :, :n]]) for layer in layers])
                cache.kv[off : off + n] = kv.permute(3, 0, 1, 2, 4).float().cpu().numpy()
                cache.last_hidden[i] = out.hidden_states[b, n - 1].float().cpu().numpy()
                done[i] = True
            cache.kv.flush()
            cache.last_hidden.flush()
            _save_npy(path / "done.npy", done)  # after the data: a crash re-does a batch, never skips one
            bar.update(len(rows))
        bar.close()
        meta["complete"] = True
        write_json_atomic(meta_path, meta)
        del cache
        return cls.open(model, corpus, path)

    # ------------------------------------------------------------------------------------------ scoring

    def states(self, doc_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(KV [layers, 2, kv_heads, tokens, head_dim], last hidden [hidden]) of one passage's prompt."""
        if doc_id not in self.row:
            raise UniragError(f"Document {doc_id!r} is not in the self-check cache {self.path}.")
        i = self.row[doc_id]
        off, n = int(self.offsets[i]), int(self.lengths[i])
        kv = torch.from_numpy(np.array(self.kv[off : off + n])).permute(1, 2, 3, 0, 4)  # a copy: memmaps are read-only
        return kv, torch.from_numpy(np.array(self.last_hidden[i]))

    @torch.inference_mode()
    def question_likelihood(self, model: JointModel, question: str, doc_ids: Sequence[str]) -> list[float]:
        """Mean log-probability of the question's tokens after each passage's self-check prompt: the same
        quantity as `decoding.question_likelihood`, with the passages read from the cache. Left-padded batch:
        each row's question tokens sit at their own positions (after its prompt) and never see the padding."""
        if not doc_ids:
            return []
        q_ids = question_ids(model.tokenizer, question)
        states = [self.states(d) for d in doc_ids]
        device = model.device
        dtype = model.causal_lm.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        lm_head = model.causal_lm.lm_head
        with model.reading_mode(adapter=False):
            head_dtype = lm_head.weight.dtype if lm_head.weight.dtype.is_floating_point else dtype
            first = torch.stack([h for _, h in states]).to(device=device, dtype=head_dtype)
            logp_first = lm_head(first).float().log_softmax(-1)[:, q_ids[0]]
            if len(q_ids) == 1:
                return logp_first.tolist()
            from transformers import DynamicCache

            lengths = [kv.shape[3] for kv, _ in states]
            width = max(lengths)
            layers, _, kv_heads, _, head_dim = states[0][0].shape
            padded = torch.zeros(len(states), layers, 2, kv_heads, width, head_dim, dtype=dtype)
            for b, ((kv, _), n) in enumerate(zip(states, lengths, strict=True)):
                padded[b, :, :, :, width - n :] = kv.to(dtype)
            padded = padded.to(device)
            cache = DynamicCache(config=model.base_config)
            for layer in range(layers):
                cache.update(padded[:, layer, 0], padded[:, layer, 1], layer)
            steps = len(q_ids) - 1
            ids = torch.tensor([q_ids[:-1]] * len(states), device=device)
            mask = torch.tensor([[0] * (width - n) + [1] * (n + steps) for n in lengths], device=device)
            positions = torch.tensor([[n + t for t in range(steps)] for n in lengths], device=device)
            out = model(ids, attention_mask=mask, past_key_values=cache, position_ids=positions, use_cache=True,
                        pathway=False, bridge=False, return_lm_logits=False)
            logp = lm_head(out.hidden_states).float().log_softmax(-1)
        target = torch.tensor(q_ids[1:], device=device).expand(len(states), -1)
        rest = logp.gather(-1, target[..., None])[..., 0]
        return ((logp_first + rest.sum(-1)) / len(q_ids)).tolist()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive, non-blocking lock on `lock_path` (POSIX; elsewhere no lock is taken)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with lock_path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UniragError(f"Another process is building the self-check cache in {lock_path.parent}; wait for it "
                              "to finish (its progress bar) or stop it, then run again.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_sizes(path: Path, meta: dict[str, Any]) -> None:
    """Both data files hold exactly what the metadata says (a truncated copy fails here, not deep in numpy)."""
    tokens = max(int(sum(meta["lengths"])), 1)
    per_token = meta["layers"] * 2 * meta["kv_heads"] * meta["head_dim"]
    expected = {
        "kv.bin": tokens * per_token * np.dtype(STORAGE_DTYPES[meta["storage_dtype"]]).itemsize,
        "last_hidden.bin": max(len(meta["doc_ids"]), 1) * meta["hidden"] * 4,
    }
    for name, size in expected.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise UniragError(f"{file} is missing or has the wrong size (truncated?); delete {path} and rebuild the "
                              "self-check cache.")


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


__all__ = ["PassageCache", "cache_fingerprint", "default_cache_path"]
