"""The meta-learned recommender (DESIGN.md "The recommender"); its training loop is :mod:`nightrec.tasks.train`.

Items: ``v_i = adaptor(text_i) + id_i`` (ID embedding only for items seen in training) and a bias
``b_i = w . text_i + id_bias_i``; a new item with text but no history gets the text part of both.

Users: a prior ``u0`` from the user's history -- ``TrainConfig.prior`` "pooled" (the default: a long-term mean and a
learned recency-weighted mean of history-side item vectors, FISM-like, order-free), "sequence" (a causal pre-LN
transformer over the newest ``seq_max_len`` history-side vectors, positions counted from the newest, its state at the
newest item, as in SASRec) or "both" (their sum) -- plus an optional language-model profile vector, then
``inner_steps`` gradient steps on the user's own interactions (full-softmax cross-entropy over the catalogue, gradient
written in closed form so every user in a batch adapts at once): ``u <- u - alpha_t * grad``, with ``alpha_t`` one
learned step size per dimension and step (Meta-SGD). The prior, adaptors, item tables and step sizes are meta-learned
over users as tasks: support = a user's first ``s`` interactions (``s`` drawn from 1 upwards so cold users are trained
for), query = the next ones; the query loss is differentiated through the inner steps (second order).

Scores are ``u . v_i + b_i``; :meth:`Recommender.served_vectors` folds the bias in as an extra dimension.

Layout: :mod:`~nightrec.model.config` (the hyper-parameters the network and its training share),
:mod:`~nightrec.model.network` (the parameters and the differentiable forward pass), :mod:`~nightrec.model.sequences`
(event frames to padded item-index histories, for training and evaluation alike), :mod:`~nightrec.model.recommender`
(the trained model with its catalogue: scores, served vectors, save/load).
"""

from nightrec.model.config import TrainConfig
from nightrec.model.network import MetaRecModel
from nightrec.model.recommender import FORMAT_VERSION, Recommender
from nightrec.model.sequences import pad_histories, user_sequences

__all__ = ["FORMAT_VERSION", "MetaRecModel", "Recommender", "TrainConfig", "pad_histories", "user_sequences"]
