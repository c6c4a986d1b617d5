"""SASRec-CE as the evaluation's sequential peer: the model and its tuning live in :mod:`nightrec.model.sasrec`
(nightrec's own sequence part is the same network, tuned the same way on the night's validation).

It is a peer, not the product: the published recipe, early stopping on validation NDCG@10, a small grid.
"""

from nightrec.model.sasrec import SASRec, default_grid, tune_sasrec

__all__ = ["SASRec", "default_grid", "tune_sasrec"]
