"""Publishing every user's top-k: seen and excluded items removed before the cut, reasons from history, the checker,
and the champion gate deciding whose lists are published."""

from __future__ import annotations

import datetime as dt
import functools

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightrec.storage import publication, registry, tracking
from nightrec.storage.lake import Lake
from nightrec.storage.vectors import ServedVectors
from nightrec.tasks import index, publish

RUN = dt.date(2026, 3, 10)
K = 5


def world(n_users: int = 40, n_items: int = 60, dim: int = 8, seed: int = 0, noise: float = 0.0):
    """Users whose vectors are the mean of their history items' vectors (+ noise), like the model's pooled prior."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    item_ids = [f"i{j:03d}" for j in range(n_items)]
    user_ids = [f"u{j:03d}" for j in range(n_users)]
    rows = []
    for u, user in enumerate(user_ids):
        if u == 0:
            continue  # a known user without history (from the user table)
        n_hist = 1 if u == 1 else n_items - 2 if u == 2 else int(rng.integers(2, 12))
        for j, item in enumerate(rng.choice(n_items, n_hist, replace=False)):
            rows.append((user, item_ids[item], dt.datetime(2026, 3, 1, tzinfo=dt.UTC) + dt.timedelta(hours=j)))
    # events on the run date itself must not count as seen
    rows.append((user_ids[3], item_ids[0], dt.datetime(2026, 3, 10, 5, tzinfo=dt.UTC)))
    history = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    before = history.filter(pl.col("timestamp") < dt.datetime(2026, 3, 10, tzinfo=dt.UTC))
    users = np.zeros((n_users, dim), np.float32)
    index_of = {item: j for j, item in enumerate(item_ids)}
    for (user,), frame in before.group_by(["user_id"]):
        users[user_ids.index(user)] = items[[index_of[i] for i in frame["item_id"]]].mean(0)
    users += noise * rng.normal(size=users.shape).astype(np.float32)
    bias = rng.normal(scale=0.1, size=(n_items, 1)).astype(np.float32)
    vectors = ServedVectors(
        user_ids,
        np.hstack([users, np.ones((n_users, 1), np.float32)]),
        item_ids,
        np.hstack([items, bias]),
        {"bias_folded": True},
    )
    catalogue = pl.DataFrame({"item_id": item_ids, "title": [f"Title {i}" for i in item_ids]})
    return vectors, history, catalogue


def brute_force(vectors: ServedVectors, history: pl.DataFrame, k: int, exclude=()) -> dict[str, list[str]]:
    before = publish.history_before(history, RUN)
    seen = dict(before.group_by("user_id").agg(pl.col("item_id")).iter_rows())
    scores = vectors.user_matrix @ vectors.item_matrix.T
    out = {}
    for u, user in enumerate(vectors.user_ids):
        banned = set(seen.get(user, [])) | set(exclude)
        order = [vectors.item_ids[j] for j in np.argsort(-scores[u], kind="stable")]
        out[user] = [item for item in order if item not in banned][:k]
    return out


def build(tmp_path, vectors, history, items, exclude=None, exact_max_items=index.EXACT_MAX_ITEMS, batch_users=7):
    index.build_checked_index(
        vectors.item_matrix,
        vectors.item_ids,
        vectors.user_matrix,
        tmp_path / "idx",
        k=K,
        exact_max_items=exact_max_items,
    )
    batches = list(
        publish.build_lists(
            vectors,
            tmp_path / "idx",
            history,
            items,
            k=K,
            run_date=RUN,
            model_version="7",
            exclude_items=exclude,
            batch_users=batch_users,
        )
    )
    return pa.Table.from_batches(batches)


def test_lists_match_brute_force_and_pass_the_checker(tmp_path):
    vectors, history, items = world()
    exclude = {"i005", "i006"}
    table = build(tmp_path, vectors, history, items, exclude)
    recommendable = [i for i in vectors.item_ids if i not in exclude]
    before = publish.history_before(history, RUN)
    assert before.height == history.height - 1  # the event on the run date is not history
    assert publish.check_lists(table, before, vectors.user_ids, K, catalogue=recommendable).problems == []
    expected = brute_force(vectors, history, K, exclude)
    got = pl.from_arrow(table).sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id")
    assert dict(got.iter_rows()) == expected
    frame = pl.from_arrow(table)
    assert frame["model_version"].unique().to_list() == ["7"] and frame["run_date"].unique().to_list() == [RUN]
    single = frame.filter(pl.col("user_id") == "u001")
    only = history.filter(pl.col("user_id") == "u001")["item_id"][0]
    assert single.height == K
    assert all(
        r == [{"item_id": only, "title": f"Title {only}", "weight": r[0]["weight"], "phrase": None}]
        for r in single["reasons"].to_list()
    )
    assert frame.filter(pl.col("user_id") == "u000")["reasons"].list.len().max() == 0  # no history, no reasons


def test_reasons_are_the_closest_history_items(tmp_path):
    vectors, history, items = world()
    table = pl.from_arrow(build(tmp_path, vectors, history, items))
    unit = vectors.item_matrix[:, :-1] / np.linalg.norm(vectors.item_matrix[:, :-1], axis=1, keepdims=True)
    row = {item: j for j, item in enumerate(vectors.item_ids)}
    before = publish.history_before(history, RUN)
    for user, item, reasons in table.filter(pl.col("user_id") == "u010").select("user_id", "item_id", "reasons").rows():
        hist = before.filter(pl.col("user_id") == user)["item_id"].to_list()
        sims = sorted(((float(unit[row[h]] @ unit[row[item]]), h) for h in hist), reverse=True)[:3]
        assert [r["item_id"] for r in reasons] == [h for _, h in sims]
        assert [r["weight"] for r in reasons] == pytest.approx([s for s, _ in sims], abs=1e-5)


def test_user_who_has_seen_nearly_everything_gets_what_is_left(tmp_path):
    vectors, history, items = world()
    table = build(tmp_path, vectors, history, items, exclude={"i059"})
    left = pl.from_arrow(table).filter(pl.col("user_id") == "u002")
    before = publish.history_before(history, RUN)
    unseen = set(vectors.item_ids) - set(before.filter(pl.col("user_id") == "u002")["item_id"]) - {"i059"}
    assert set(left["item_id"]) == unseen and len(unseen) < K
    problems = publish.check_lists(table, before, vectors.user_ids, K).problems
    assert problems and "u002" in problems[0]  # exactly k required without a catalogue
    recommendable = [i for i in vectors.item_ids if i != "i059"]
    assert publish.check_lists(table, before, vectors.user_ids, K, catalogue=recommendable).problems == []


def test_approximate_index_queries_deeper_until_k_unseen(tmp_path):
    vectors, history, items = world(n_users=60, n_items=400, seed=1)
    table = build(tmp_path, vectors, history, items, exact_max_items=100, batch_users=16)
    assert publish.check_lists(table, publish.history_before(history, RUN), vectors.user_ids, K).problems == []
    expected = brute_force(vectors, history, K)
    got = dict(
        pl.from_arrow(table).sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id").iter_rows()
    )
    agree = np.mean([len(set(got[u]) & set(expected[u])) / K for u in expected])
    assert agree >= 0.99


def test_checker_finds_each_kind_of_problem(tmp_path):
    vectors, history, items = world()
    before = publish.history_before(history, RUN)
    good = pl.from_arrow(build(tmp_path, vectors, history, items))
    check = lambda frame: publish.check_lists(frame.to_arrow(), before, vectors.user_ids, K).problems  # noqa: E731
    user = "u010"
    seen_item = before.filter(pl.col("user_id") == user)["item_id"][0]
    first = (pl.col("user_id") == user) & (pl.col("rank") == 1)
    cases = {
        "users without a list": good.filter(pl.col("user_id") != user),
        "ranks are not 1..n": good.filter(~((pl.col("user_id") == user) & (pl.col("rank") == 2))),
        "already-seen": good.with_columns(pl.when(first).then(pl.lit(seen_item)).otherwise("item_id").alias("item_id")),
        "duplicate": good.with_columns(
            pl.when(first)
            .then(pl.lit(good.filter((pl.col("user_id") == user) & (pl.col("rank") == 2))["item_id"][0]))
            .otherwise("item_id")
            .alias("item_id")
        ),
        "without reasons": good.with_columns(
            pl.when(first).then(pl.lit([], dtype=good.schema["reasons"])).otherwise("reasons").alias("reasons")
        ),
        "not from the user's history": good.with_columns(
            pl.when(first)
            .then(good.filter(pl.col("user_id") == "u001")["reasons"][0].implode())
            .otherwise("reasons")
            .alias("reasons")
        ),
        "scores increase": good.with_columns(
            pl.when(first).then(pl.lit(-99.0, pl.Float32)).otherwise("score").alias("score")
        ),
    }
    for what, frame in cases.items():
        problems = check(frame)
        assert any(what in p for p in problems), (what, problems)
        assert any(user in p for p in problems), (what, problems)
        # checked a few users at a time (as on a million users), the same problems are found and counted
        chunked = publish.check_lists(frame.to_arrow(), before, vectors.user_ids, K, chunk_users=7).problems
        assert sorted(p.split(", e.g.")[0] for p in chunked) == sorted(p.split(", e.g.")[0] for p in problems)
        assert any(user in p for p in chunked)
        # read back from a file one user range at a time (how the publish stage checks a night): the same problems
        path = tmp_path / f"{what}.parquet"
        pq.write_table(frame.sort("user_id", "rank").to_arrow(), path, row_group_size=40)
        streamed = publish.check_lists(
            functools.partial(publication.read_user_range, path), before, vectors.user_ids, K, chunk_users=7
        ).problems
        assert streamed == chunked
    extra = good.filter(pl.col("user_id") == "u001").with_columns(pl.lit("zz-stranger").alias("user_id"))
    stranger = publish.check_lists(
        pl.concat([good, extra]).to_arrow(), before, vectors.user_ids, K, chunk_users=7
    ).problems
    assert any("not in the known-user list" in p and "zz-stranger" in p for p in stranger)  # past the last range


def _unexplainable(history: pl.DataFrame, users: list[str]) -> pl.DataFrame:
    """``history`` with each of ``users``' items swapped for one the served vectors lack (newer than the model)."""
    mine = pl.col("user_id").is_in(users)
    return history.with_columns(
        pl.when(mine).then(pl.lit("new-") + pl.col("item_id")).otherwise("item_id").alias("item_id")
    )


def test_users_the_model_cannot_explain_are_counted_not_failed_up_to_the_share(tmp_path):
    vectors, history, items = world()  # 40 known users
    odd = ["u005", "u017"]
    history = _unexplainable(history, odd)
    before = publish.history_before(history, RUN)
    table = build(tmp_path, vectors, history, items)
    lists = pl.from_arrow(table)
    assert lists.filter(pl.col("user_id").is_in(odd))["reasons"].list.len().max() == 0
    assert lists.filter(~pl.col("user_id").is_in(odd + ["u000"]))["reasons"].list.len().min() >= 1

    result = publish.check_lists(
        table, before, vectors.user_ids, K, catalogue=vectors.item_ids, explainable=vectors.item_ids, chunk_users=7
    )
    assert result.ok and result.problems == []
    assert (result.unexplained_users, result.users, result.unexplained_examples) == (2, 40, odd)
    assert result.unexplained_share == 0.05  # at the default limit, not above it

    strict = publish.check_lists(
        table,
        before,
        vectors.user_ids,
        K,
        catalogue=vectors.item_ids,
        explainable=vectors.item_ids,
        max_unexplained_share=0.04,
    )
    assert not strict.ok and len(strict.problems) == 1
    assert "2 of 40 users (5.0%)" in strict.problems[0] and "max_unexplained_share=0.04" in strict.problems[0]
    assert "u005" in strict.problems[0]

    # Without the served items the checker cannot tell: every reasonless row of a user with history is a problem.
    unknown = publish.check_lists(table, before, vectors.user_ids, K)
    assert any("rows without reasons" in p and "u005" in p for p in unknown.problems)


def test_lists_that_are_wrong_still_fail_beside_unexplained_users(tmp_path):
    vectors, history, items = world()
    history = _unexplainable(history, ["u005"])
    before = publish.history_before(history, RUN)
    good = pl.from_arrow(build(tmp_path, vectors, history, items))
    seen_item = before.filter(pl.col("user_id") == "u010")["item_id"][0]
    first = (pl.col("user_id") == "u010") & (pl.col("rank") == 1)
    cases = {
        "already-seen items recommended": good.with_columns(
            pl.when(first).then(pl.lit(seen_item)).otherwise("item_id").alias("item_id")
        ),
        # u010's history is one the model knows: its reasons must be there
        "rows without reasons (user has history the model can explain)": good.with_columns(
            pl.when(first).then(pl.lit([], dtype=good.schema["reasons"])).otherwise("reasons").alias("reasons")
        ),
        "users without a list": good.filter(pl.col("user_id") != "u010"),
    }
    for what, frame in cases.items():
        result = publish.check_lists(
            frame.to_arrow(), before, vectors.user_ids, K, catalogue=vectors.item_ids, explainable=vectors.item_ids
        )
        assert any(what in p for p in result.problems), (what, result.problems)
        assert all("u005" not in p for p in result.problems) and result.unexplained_users == 1


def test_reasons_for_items_the_catalogue_lacks_are_titled_by_id(tmp_path):
    vectors, history, items = world()
    lagging = items.filter(~pl.col("item_id").is_in(["i003", "i004"]))  # their catalogue rows have not landed yet
    table = pl.from_arrow(build(tmp_path, vectors, history, lagging))
    titles = {r["item_id"]: r["title"] for reasons in table["reasons"].to_list() for r in reasons if r is not None}
    cited = {i for i in ("i003", "i004") if i in titles}
    assert cited, "the fixture should cite i003 or i004 as a reason"
    assert all(titles[i] == i for i in cited) and titles.get("i000", "Title i000") == "Title i000"


def ndcg_next_item(vectors: ServedVectors, history: pl.DataFrame, holdout: dict[str, str]) -> float:
    lists = brute_force(vectors, history, 10)
    gains = [1.0 / np.log2(lists[u].index(item) + 2) if item in lists[u] else 0.0 for u, item in holdout.items()]
    return float(np.mean(gains))


def test_worse_model_is_not_promoted_and_champion_lists_are_published(tmp_path):
    champion_vectors, history, items = world(noise=0.05)
    # tonight's model is deliberately worse: user vectors scrambled across users
    rng = np.random.default_rng(3)
    worse = ServedVectors(
        champion_vectors.user_ids,
        champion_vectors.user_matrix[rng.permutation(len(champion_vectors.user_ids))],
        champion_vectors.item_ids,
        champion_vectors.item_matrix,
        {"bias_folded": True},
    )
    # holdout: each user's best unseen item under the true taste
    truth = brute_force(world(noise=0.0)[0], history, 1)
    holdout = {u: items_[0] for u, items_ in truth.items() if items_}
    champ_ndcg, new_ndcg = ndcg_next_item(champion_vectors, history, holdout), ndcg_next_item(worse, history, holdout)
    assert new_ndcg < champ_ndcg * 0.98

    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(client, "test", str(tmp_path / "artifacts"))
    name = "nightrec-recommender"
    (tmp_path / "m1").mkdir(), (tmp_path / "m2").mkdir()
    v1 = registry.register_model(
        client, name, tmp_path / "m1", tracking.start_run(client, exp, "n1"), {"ndcg_at_10": champ_ndcg}
    )
    registry.promote(client, name, v1)
    v2 = registry.register_model(
        client, name, tmp_path / "m2", tracking.start_run(client, exp, "n2"), {"ndcg_at_10": new_ndcg}
    )
    champ = registry.champion(client, name)
    decision = registry.gate(new_ndcg, champ.ndcg_at_10, popularity_ndcg=0.0, tolerance=0.02)
    assert not decision.promote and decision.publish == "champion"
    assert registry.champion(client, name).version == v1 != v2

    serving, version = (worse, v2) if decision.publish == "new" else (champion_vectors, champ.version)
    index.build_checked_index(serving.item_matrix, serving.item_ids, serving.user_matrix, tmp_path / "idx", k=K)
    lake = Lake(tmp_path / "lake")
    batches = publish.build_lists(serving, tmp_path / "idx", history, items, k=K, run_date=RUN, model_version=version)
    publication.publish(lake, RUN, batches, {"mlflow_run_id": "r", "model_version": version})
    pointer, table = publication.read_latest(lake)
    assert pointer["model_version"] == v1 and set(table["model_version"].to_pylist()) == {v1}
    got = dict(
        pl.from_arrow(table).sort("user_id", "rank").group_by("user_id", maintain_order=True).agg("item_id").iter_rows()
    )
    assert got == brute_force(champion_vectors, history, K)


@pytest.mark.movielens
def test_movielens_lists_for_every_user_pass_the_checker(movielens_100k, tmp_path):
    """The whole serving path on MovieLens-100K with cheap co-occurrence vectors (no training): every one of the 943
    users gets 50 unseen items with reasons from their history, published and read back through LATEST."""
    from nightrec.sources import movielens

    data = movielens.load(movielens_100k)
    run_date = (data.events["timestamp"].max() + dt.timedelta(days=1)).date()
    item_ids = data.items["item_id"].to_list()
    user_ids = sorted(data.events["user_id"].unique().to_list())
    offsets, rows = publish.user_histories(data.events, user_ids, item_ids)
    matrix = np.zeros((len(user_ids), len(item_ids)), np.float32)
    matrix[np.repeat(np.arange(len(user_ids)), np.diff(offsets)), rows] = 1.0
    # items: a random sketch of who watched them (items watched by the same people get similar vectors)
    items = (matrix.T @ np.random.default_rng(0).normal(size=(len(user_ids), 32))).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True) + 1e-6
    vectors = ServedVectors(user_ids, (matrix @ items / np.maximum(matrix.sum(1, keepdims=True), 1)), item_ids, items)
    index.build_checked_index(vectors.item_matrix, item_ids, vectors.user_matrix, tmp_path / "idx", k=50)
    lake = Lake(tmp_path / "lake")
    batches = publish.build_lists(
        vectors, tmp_path / "idx", data.events, data.items, k=50, run_date=run_date, model_version="1", batch_users=256
    )
    stats = publication.publish(lake, run_date, batches, {"mlflow_run_id": "r", "model_version": "1"})
    assert stats["users"] == 943 and stats["rows"] == 943 * 50
    _, table = publication.read_latest(lake)
    assert publish.check_lists(table, data.events, user_ids, 50).problems == []
    one = publication.read_user_list(lake, user_ids[0])
    assert one["rank"].to_list() == list(range(1, 51)) and one["reasons"].list.len().min() >= 1
    assert all(r["title"] for reasons in one["reasons"].to_list() for r in reasons)


def test_the_checker_reports_coverage_concentration_and_reason_weights(tmp_path):
    vectors, history, items = world()
    table = build(tmp_path, vectors, history, items)
    before = publish.history_before(history, RUN)
    stats = publish.check_lists(table, before, vectors.user_ids, K, chunk_users=7).stats
    frame = pl.from_arrow(table)
    assert stats["list_items_distinct"] == frame["item_id"].n_unique()
    top_count = frame.group_by("item_id").len()["len"].max()
    assert stats["list_top_item_share"] == pytest.approx(top_count / frame["user_id"].n_unique())
    top_weights = frame.select(pl.col("reasons").list.first().struct.field("weight")).drop_nulls().to_series()
    assert stats["reason_weight_p50"] == pytest.approx(top_weights.median(), abs=0.05)  # to within one bin
    assert stats["reason_weight_p10"] <= stats["reason_weight_p50"] <= stats["reason_weight_p90"]
    assert stats["reason_phrase_share"] == 0.0  # the catalogue has no genres and no series
