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

from nightrec.model import TrainConfig, user_sequences
from nightrec.ranking import per_user_metrics, top_k_unseen
from nightrec.tasks import protocol
from nightrec.tasks.catalogue import night_item_ids
from nightrec.tasks.evaluate import fit_nightrec

name, seed = sys.argv[1], int(sys.argv[2])
ds = quality.load(name)
vec = quality.item_vectors(ds)
item_ids, missing = night_item_ids(ds.items, ds.events)
n = len(item_ids)
has_text = np.arange(n) < n - len(missing)
if missing:
    vec = np.vstack([vec, np.zeros((len(missing), vec.shape[1]), vec.dtype)])
_, seqs = user_sequences(ds.events, {it: i for i, it in enumerate(item_ids)})
seqs = [s for s in seqs if len(s)]
cold = protocol.pick_cold_items(seqs, n, seed, protocol.COLD_ITEM_SHARE, has_text)
split = protocol.chronological_split(seqs, seed, cold_items=cold)
cfg = TrainConfig(seed=seed, tuning_trials=1)
scorer = fit_nightrec(split.train, item_ids, vec, cfg)
trained = np.zeros(n, bool)
for h in split.train:
    trained[np.asarray(h)] = True
new = ~trained & has_text  # what serving would treat as new
print("new items", int(new.sum()), "cold", len(cold))


def slotted(scores, hist, k, s):
    top = top_k_unseen(scores, hist, k)
    if s == 0:
        return top
    masked = np.where(new[None, :], scores, -np.inf)
    best_new = top_k_unseen(masked, hist, s)
    out = top.copy()
    for u in range(len(top)):
        have = new[top[u][top[u] >= 0]].sum()
        need = s - have
        if need <= 0:
            continue
        cand = [j for j in best_new[u] if j >= 0 and j not in set(top[u])][:need]
        keep = [j for j in top[u] if j >= 0 and not new[j]]
        newin = [j for j in top[u] if j >= 0 and new[j]]
        drop = len(cand)
        known = keep[: len(keep) - drop] if drop else keep
        # known items keep their order; new ones (in list and slotted) go to the end in score order... simple: tail
        row = [j for j in top[u] if j in set(known) or j in set(newin)] + cand
        out[u, : len(row)] = row
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
