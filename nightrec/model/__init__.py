"""The meta-learned recommender (docs/design.md "The recommender"); its training loop is :mod:`nightrec.tasks.train`.

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

The order-aware part (:mod:`~nightrec.model.sasrec`): a SASRec-CE network over the ordered history, tuned on the
night's validation (the same grid as the evaluation's SASRec peer, each trial early-stopped), whose score
``s_u . e_i`` is added with one weight per served network (users with fewer than ``cold_below`` interactions, and the
rest), fitted on validation; then the popularity prior ``beta(n) * log(1 + count_i)``, one weight per history-length
bucket. The weights are fitted on new users (a held-out share cut at n interactions) together with known users' next
items (their newest 20 % held out), so the blend never costs either population what it does not win back.

Scores are ``u . v_i + b_i + w(n) s_u . e_i + beta(n) p_i``: :meth:`Recommender.served_vectors` concatenates the parts
into one inner product (bias, sequence block and prior as extra dimensions), so one FAISS index serves the sum.

Reasons (:mod:`~nightrec.model.reasons`): each history item's additive part of the meta-learned score, exported with
the served vectors; a deletion test measures that removing the top reason lowers the item's score more than removing
a random history item.

Layout: :mod:`~nightrec.model.config` (the hyper-parameters the network and its training share),
:mod:`~nightrec.model.network` (the parameters and the differentiable forward pass), :mod:`~nightrec.model.sequences`
(event frames to padded item-index histories, for training and evaluation alike), :mod:`~nightrec.model.recommender`
(the trained model with its catalogue: scores, served vectors, save/load), :mod:`~nightrec.model.sasrec` (the
sequence part), :mod:`~nightrec.model.reasons` (attribution and its deletion test).
"""

from nightrec.model.config import TrainConfig
from nightrec.model.network import MetaRecModel
from nightrec.model.recommender import FORMAT_VERSION, Recommender
from nightrec.model.sequences import pad_histories, user_sequences

__all__ = ["FORMAT_VERSION", "MetaRecModel", "Recommender", "TrainConfig", "pad_histories", "user_sequences"]
