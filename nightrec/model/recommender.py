"""A trained :class:`MetaRecModel` with its catalogue (:class:`Recommender`): scores, served vectors, save/load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from nightrec.model.config import TrainConfig, cold_config
from nightrec.model.itemitem import ItemItem
from nightrec.model.network import MetaRecModel
from nightrec.model.reasons import LinearPart, ReasonBlock, ReasonSpace
from nightrec.model.sasrec import SASRec, SASRecEnsemble, sequence_from_arrays
from nightrec.model.sequences import pad_histories, profile_matrix, user_sequences
from nightrec.storage import atomic
from nightrec.storage.vectors import ServedVectors

FORMAT_VERSION = 1  # the popularity prior is additive: a version-1 file without it loads with no prior
# Lower bounds of the history-length buckets of the popularity prior: n = 0, 1, 2, 3, 4, 5, 6-10, 11-20, 21+.
POPULARITY_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 11, 21)


def history_bucket(lengths) -> np.ndarray:
    """Bucket index (into :data:`POPULARITY_BUCKETS`) of each history length."""
    return np.searchsorted(POPULARITY_BUCKETS, np.asarray(lengths, dtype=np.int64), side="right") - 1


def bucket_key(bucket: int) -> str:
    """A bucket's name in metric keys: ``n0`` .. ``n5``, ``n6_10``, ``n11_20``, ``n21up``."""
    lo = POPULARITY_BUCKETS[bucket]
    if bucket + 1 == len(POPULARITY_BUCKETS):
        return f"n{lo}up"
    hi = POPULARITY_BUCKETS[bucket + 1] - 1
    return f"n{lo}" if hi == lo else f"n{lo}_{hi}"


@dataclass
class Recommender:
    """A trained :class:`MetaRecModel` with its catalogue: scores, served vectors, save/load."""

    model: MetaRecModel
    item_ids: list[str]
    item_text_vectors: np.ndarray
    config: TrainConfig
    meta: dict = field(default_factory=dict)
    cold_model: MetaRecModel | None = None  # serves users with fewer than config.cold_below interactions
    # The popularity prior: scores gain ``beta[bucket(len(history))] * popularity[i]``, ``popularity`` being
    # log(1 + training count) per item and ``beta`` one weight per :data:`POPULARITY_BUCKETS` bucket, fitted on
    # calibration users (nightrec.tasks.train). None: no prior (a model saved before it existed).
    popularity: np.ndarray | None = None
    popularity_beta: np.ndarray | None = None
    # The order-aware part: a SASRec-CE network over the ordered history (nightrec.model.sasrec) whose score is
    # added with one weight per history-length bucket (``sequence_weight``, fitted on the calibration users beside
    # the popularity prior). None: no sequence part (a model saved before it existed, or turned off).
    sequence: SASRec | SASRecEnsemble | None = None
    sequence_weight: np.ndarray | None = None
    # The item-item part: a low-rank shrunk item-item model (nightrec.model.itemitem), added the same way with its
    # own weight per bucket (``item_item_weight``). None: none (an older model, or turned off).
    item_item: ItemItem | None = None
    item_item_weight: np.ndarray | None = None
    # A score offset per item (n_items,), added to every served network's bias: the calibrated lift of the items
    # whose tables were predicted from their text (nightrec.model.new_items). None: none.
    item_offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.model.eval()
        if self.cold_model is not None:
            self.cold_model.eval()

    @property
    def text(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.item_text_vectors, dtype=np.float32))

    @property
    def has_prior(self) -> bool:
        return self.popularity is not None and self.popularity_beta is not None

    def prior_weights(self, lengths) -> np.ndarray:
        """The popularity prior's weight for users with these history lengths (0 without a prior)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if not self.has_prior:
            return np.zeros(len(lengths), dtype=np.float32)
        return np.asarray(self.popularity_beta, dtype=np.float32)[history_bucket(lengths)]

    @property
    def has_sequence(self) -> bool:
        return self.sequence is not None and self.sequence_weight is not None

    @property
    def has_item_item(self) -> bool:
        return self.item_item is not None and self.item_item_weight is not None

    def item_item_weights(self, lengths) -> np.ndarray:
        """The item-item part's weight for users with these history lengths (0 without one)."""
        if not self.has_item_item:
            return np.zeros(len(lengths), dtype=np.float32)
        return np.asarray(self.item_item_weight, dtype=np.float32)[history_bucket(lengths)]

    def sequence_weights(self, lengths) -> np.ndarray:
        """The sequence part's weight for users with these history lengths (0 without one)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if not self.has_sequence:
            return np.zeros(len(lengths), dtype=np.float32)
        return np.asarray(self.sequence_weight, dtype=np.float32)[history_bucket(lengths)]

    @torch.inference_mode()
    def item_matrix(self, prior: bool = True, sequence: bool = True, item_item: bool = True) -> np.ndarray:
        """(n_items, dim + 1) item vectors, bias as the last column; the cold model's block appended when present,
        then (with ``sequence``) the sequence part's item embeddings.

        With a popularity prior (and ``prior``), a last column of log(1 + training count), and a zero column when
        needed to keep the width even (product quantisers split the width in 2 or 4)."""
        blocks = []
        for model in self._models():
            out, bias, _ = model.item_tables(self.text)
            if self.item_offset is not None:  # each user reads exactly one network's bias column
                bias = bias + torch.from_numpy(np.asarray(self.item_offset, dtype=np.float32))
            blocks += [out, bias.unsqueeze(1)]
        if sequence and self.has_sequence:
            blocks.append(torch.from_numpy(self.sequence.item_vectors()))
        if item_item and self.has_item_item:
            blocks.append(torch.from_numpy(self.item_item.items))
        matrix = torch.cat(blocks, dim=1).numpy().astype(np.float32)
        if prior and self.has_prior:
            matrix = self._with_prior_column(matrix, np.asarray(self.popularity, dtype=np.float32))
        return matrix

    @staticmethod
    def _with_prior_column(matrix: np.ndarray, column: np.ndarray) -> np.ndarray:
        pad = (matrix.shape[1] + 1) % 2
        extra = np.zeros((matrix.shape[0], 1 + pad), dtype=np.float32)
        extra[:, 0] = column
        return np.concatenate([matrix, extra], axis=1)

    def _models(self) -> list[MetaRecModel]:
        return [self.model] if self.cold_model is None else [self.model, self.cold_model]

    @torch.inference_mode()
    def _adapted(
        self, model: MetaRecModel, histories: list[np.ndarray], profiles: np.ndarray | None, batch: int
    ) -> torch.Tensor:
        out, bias, hist = model.item_tables(self.text)
        rows = [torch.zeros(0, model.config.dim)]
        for start in range(0, len(histories), batch):
            support, mask = pad_histories(histories[start : start + batch], self.config.max_history)
            prof = None if profiles is None else torch.from_numpy(profiles[start : start + batch].astype(np.float32))
            u0 = model.prior_vectors(hist, support, mask, prof)
            rows.append(torch.cat([model.adapt(u0, out, bias, support, mask), torch.ones(len(u0), 1)], dim=1))
        return torch.cat(rows[1:]) if len(rows) > 1 else torch.zeros(0, model.config.dim + 1)

    def user_matrix(
        self,
        histories: list[np.ndarray],
        profiles: np.ndarray | None = None,
        batch: int = 1024,
        prior: bool = True,
        sequence: bool = True,
        item_item: bool = True,
    ) -> np.ndarray:
        """Adapted user vectors with a trailing 1 (the bias dimension); with a cold model, a user gets the warm block
        or the cold block (the other one zero) by the length of their history. With a popularity prior (and
        ``prior``), a last column holding the prior's weight for the user's history length (see :meth:`item_matrix`).
        """
        matrix = self._user_blocks(histories, profiles, batch)
        if sequence and self.has_sequence:
            weights = self.sequence_weights([len(h) for h in histories])
            matrix = np.concatenate([matrix, weights[:, None] * self.sequence.states(histories)], axis=1)
        if item_item and self.has_item_item:
            weights = self.item_item_weights([len(h) for h in histories])
            matrix = np.concatenate([matrix, weights[:, None] * self.item_item.states(histories)], axis=1)
        if prior and self.has_prior:
            matrix = self._with_prior_column(matrix, self.prior_weights([len(h) for h in histories]))
        return matrix

    def _user_blocks(self, histories: list[np.ndarray], profiles: np.ndarray | None, batch: int) -> np.ndarray:
        if self.cold_model is None:
            return self._adapted(self.model, histories, profiles, batch).numpy().astype(np.float32)
        # Each user is adapted by the one model that serves them (adapting costs O(catalogue) per user).
        short = np.array([len(h) < self.config.cold_below for h in histories], dtype=bool)
        warm_dim = self.model.config.dim + 1
        both = np.zeros((len(histories), warm_dim + self.cold_model.config.dim + 1), dtype=np.float32)
        for model, rows, columns in (
            (self.model, np.flatnonzero(~short), slice(0, warm_dim)),
            (self.cold_model, np.flatnonzero(short), slice(warm_dim, None)),
        ):
            if len(rows):
                own = None if profiles is None else profiles[rows]
                both[rows, columns] = self._adapted(model, [histories[i] for i in rows], own, batch).numpy()
        return both

    def score_histories(
        self,
        histories: list[np.ndarray],
        profiles: np.ndarray | None = None,
        prior: bool = True,
        sequence: bool = True,
        item_item: bool = True,
    ) -> np.ndarray:
        """(n_users, n_items) scores for users given their item-index histories (time order); ``prior`` and
        ``sequence`` say whether the popularity prior and the sequence part count."""
        parts = {"prior": prior, "sequence": sequence, "item_item": item_item}
        return self.user_matrix(histories, profiles, **parts) @ self.item_matrix(**parts).T

    @torch.inference_mode()
    def reason_space(self) -> ReasonSpace:
        """The attribution arrays of each served network (:mod:`nightrec.model.reasons`) and the history lengths
        each serves."""
        blocks = []
        models = self._models()
        for m, model in enumerate(models):
            out, _, hist = model.item_tables(self.text)
            d = model.config.dim
            steps = model.config.inner_steps
            alpha = model.log_alpha.exp()
            step_sum = sum(alpha[min(t, alpha.shape[0] - 1)] for t in range(steps)) if steps else torch.zeros(d)
            mean = out * step_sum
            recent = torch.zeros_like(out)
            decay = 0.0
            if hasattr(model, "pool"):
                mean = mean + hist @ model.pool.weight[:, :d].T
                recent = hist @ model.pool.weight[:, d:].T
                decay = float(model.recency.exp())
            cold = len(models) == 2 and m == 1
            blocks.append(
                ReasonBlock(
                    items=out.numpy().astype(np.float32),
                    mean=mean.numpy().astype(np.float32),
                    recent=recent.numpy().astype(np.float32),
                    decay=decay,
                    min_history=0 if (cold or len(models) == 1) else self.config.cold_below,
                    max_history=self.config.cold_below if cold else None,
                )
            )
        linear = []
        if self.has_item_item:
            part = self.item_item
            linear.append(LinearPart(part.history, part.items, np.asarray(self.item_item_weight, np.float32)))
        return ReasonSpace(blocks, support_cap=self.config.max_history, linear=linear)

    def served_vectors(
        self,
        events: pl.DataFrame,
        user_ids: list[str],
        user_profile_vectors: dict[str, np.ndarray] | None = None,
    ) -> ServedVectors:
        """Every user's adapted vector from their history in ``events`` (a user with no events gets the prior)."""
        users, histories = user_sequences(events, self.item_index, user_ids)
        profiles = self._profile_matrix(users, user_profile_vectors)
        items = self.item_matrix()
        extra, reason_header = self.reason_space().arrays()
        return ServedVectors(
            user_ids=users,
            user_matrix=self.user_matrix(histories, profiles),
            item_ids=list(self.item_ids),
            item_matrix=items,
            meta={
                "model": "nightrec-metarec",
                "dim": items.shape[1],
                "bias_folded": True,
                "popularity_prior": self.has_prior,
                **self.meta,
                "reason_space": reason_header,
            },
            extra=extra,
        )

    def _profile_matrix(self, users: list[str], vectors: dict[str, np.ndarray] | None) -> np.ndarray | None:
        if self.model.profile is None:
            return None
        return profile_matrix(users, vectors, self.model.profile.in_features)

    # --- persistence (safetensors + json, no pickle) ------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.cold_model is not None:
            tensors |= {f"cold_model.{k}": v.detach().contiguous() for k, v in self.cold_model.state_dict().items()}
        tensors["item_text_vectors"] = torch.from_numpy(np.ascontiguousarray(self.item_text_vectors, np.float32))
        if self.has_prior:
            tensors["popularity"] = torch.from_numpy(np.ascontiguousarray(self.popularity, np.float32))
            tensors["popularity_beta"] = torch.from_numpy(np.ascontiguousarray(self.popularity_beta, np.float32))
        if self.item_offset is not None:
            tensors["item_offset"] = torch.from_numpy(np.ascontiguousarray(self.item_offset, np.float32))
        sequence_header = None
        if self.has_sequence:
            seq_tensors, sequence_header = self.sequence.arrays()
            tensors |= seq_tensors
            tensors["sequence_weight"] = torch.from_numpy(np.ascontiguousarray(self.sequence_weight, np.float32))
        item_item_header = None
        if self.has_item_item:
            part = self.item_item
            tensors["item_item.history"] = torch.from_numpy(np.ascontiguousarray(part.history, np.float32))
            tensors["item_item.items"] = torch.from_numpy(np.ascontiguousarray(part.items, np.float32))
            tensors["item_item_weight"] = torch.from_numpy(np.ascontiguousarray(self.item_item_weight, np.float32))
            item_item_header = {"rank": part.rank, "shrink": part.shrink}
        with atomic.staged_path(folder / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
        profile_dim = None if self.model.profile is None else self.model.profile.in_features
        atomic.write_json_atomic(
            folder / "model.json",
            {
                "format_version": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "item_ids": list(self.item_ids),
                "profile_dim": profile_dim,
                "popularity_buckets": list(POPULARITY_BUCKETS)
                if self.has_prior or self.has_sequence or self.has_item_item
                else None,
                "sequence": sequence_header,
                "item_item": item_item_header,
                "meta": self.meta,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: Path) -> Recommender:
        folder = Path(folder)
        header = json.loads((folder / "model.json").read_text())
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: model format {header.get('format_version')} != {FORMAT_VERSION}")
        tensors = load_file(str(folder / "model.safetensors"))
        config = TrainConfig.from_dict(header["config"])
        text = tensors.pop("item_text_vectors").numpy()
        popularity, beta = tensors.pop("popularity", None), tensors.pop("popularity_beta", None)
        item_offset = tensors.pop("item_offset", None)
        sequence, sequence_weight = None, tensors.pop("sequence_weight", None)
        if header.get("sequence") and sequence_weight is not None:
            sequence = sequence_from_arrays(tensors, header["sequence"], len(header["item_ids"]))
        item_item, item_item_weight = None, tensors.pop("item_item_weight", None)
        if header.get("item_item") and item_item_weight is not None:
            item_item = ItemItem(
                history=tensors.pop("item_item.history").numpy(),
                items=tensors.pop("item_item.items").numpy(),
                **header["item_item"],
            )
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("sequence", "item_item"))}
        buckets = header.get("popularity_buckets")
        if beta is not None and buckets is not None and tuple(buckets) != POPULARITY_BUCKETS:
            raise ValueError(f"{folder}: popularity buckets {buckets} != {list(POPULARITY_BUCKETS)}")
        model = MetaRecModel(len(header["item_ids"]), text.shape[1], config, header.get("profile_dim"))
        cold_state = {k.removeprefix("cold_model."): v for k, v in tensors.items() if k.startswith("cold_model.")}
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        cold_model = None
        if cold_state:
            cold = cold_config(config)
            cold_model = MetaRecModel(len(header["item_ids"]), text.shape[1], cold, header.get("profile_dim"))
            cold_model.load_state_dict(cold_state)
        return cls(
            model=model,
            item_ids=header["item_ids"],
            item_text_vectors=text,
            config=config,
            meta=header["meta"],
            cold_model=cold_model,
            popularity=None if popularity is None else popularity.numpy(),
            popularity_beta=None if beta is None else beta.numpy(),
            sequence=sequence,
            sequence_weight=None if sequence_weight is None else sequence_weight.numpy(),
            item_item=item_item,
            item_item_weight=None if item_item_weight is None else item_item_weight.numpy(),
            item_offset=None if item_offset is None else item_offset.numpy(),
        )
