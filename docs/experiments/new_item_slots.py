"""What reserving s of the 20 places of a list for the user's best-scored new items would do (issue #13, tenth
session, docs/quality.md): one nightrec fit on the protocol's chronological split of one seed, then each segment's
top-20 re-made with s = 0..3 places held by the user's best new items (items with text and no training events).

Run: ``NIGHTREC_DATASETS=../shared/datasets .venv/bin/python docs/experiments/new_item_slots.py NAME SEED``
(an experiment, not part of the product; it uses the search's grid alone, ``tuning_trials=1``).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality

from nightrec.model import TrainConfig
from nightrec.ranking import per_user_metrics, top_k_unseen
from nightrec.tasks import protocol
from nightrec.tasks.evaluate import fit_nightrec

name, seed = sys.argv[1], int(sys.argv[2])
ds = quality.load(name)
item_ids, vec, _, split, _ = protocol.protocol_split(ds, quality.item_vectors(ds), seed)
n, cold = len(item_ids), split.cold_items
has_text = np.abs(vec).sum(1) > 0
cfg = TrainConfig(seed=seed, tuning_trials=1)
scorer = fit_nightrec(split.train, item_ids, vec, cfg)
trained = np.zeros(n, bool)
for h in split.train:
    trained[np.asarray(h)] = True
new = ~trained & has_text  # what serving would treat as new
print("new items", int(new.sum()), "cold", len(cold))


def slotted(scores, hist, k, s):
    """Each user's top-k, with the lowest known items replaced by their best new items until s new ones are in it."""
    top = top_k_unseen(scores, hist, k)
    if s == 0:
        return top
    best_new = top_k_unseen(np.where(new[None, :], scores, -np.inf), hist, s)
    out = top.copy()
    for u, row in enumerate(top):
        listed = [j for j in row if j >= 0]
        extra = [j for j in best_new[u] if j >= 0 and j not in listed][: max(0, s - int(new[listed].sum()))]
        if not extra:
            continue
        known = [j for j in listed if not new[j]]
        dropped = set(known[len(known) - len(extra) :])
        kept = [j for j in listed if j not in dropped]  # the list's order, the extra new items at its tail
        out[u, : len(kept) + len(extra)] = kept + extra
    return out


res = {}
for s in (0, 1, 2, 3):
    r = {}
    for seg, (hist, rel) in split.segments.items():
        if seg not in ("warm", "cold_items", "cold_k1", "cold_k5"):
            continue
        sc = protocol.score_in_batches(scorer, hist)
        top = slotted(sc, hist, 20, s)
        m10, m20 = per_user_metrics(top, rel, 10), per_user_metrics(top, rel, 20)
        if seg == "cold_items":
            r["ci_recall20"] = float(np.nanmean(m20["recall"]))
            r["ci_in_lists"] = float(np.isin(top, cold).any(1).mean())
        else:
            r[f"{seg}_ndcg10"] = float(np.nanmean(m10["ndcg"]))
            r[f"{seg}_ndcg20"] = float(np.nanmean(m20["ndcg"]))
            r[f"{seg}_recall20"] = float(np.nanmean(m20["recall"]))
    res[s] = {k: round(v, 4) for k, v in r.items()}
    print(s, res[s], flush=True)
print(json.dumps(res))
