"""Adapters from the MovieLens layouts (100K ``u.*``, 1M ``*.dat``, latest ``*.csv``) to our input columns."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]


@dataclass(frozen=True)
class Dataset:
    """Events, items and (optionally) users in nightrec's input columns."""

    events: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame | None


def detect_layout(folder: Path) -> str | None:
    """'100k', '1m', 'latest' or None for a folder that is not a MovieLens download."""
    if (folder / "u.data").exists() and (folder / "u.item").exists():
        return "100k"
    if (folder / "ratings.dat").exists() and (folder / "movies.dat").exists():
        return "1m"
    if (folder / "ratings.csv").exists() and (folder / "movies.csv").exists():
        return "latest"
    return None


def load(folder: str | Path) -> Dataset:
    """Read any supported MovieLens folder; raises ValueError naming the folder when it is not one."""
    folder = Path(folder)
    layout = detect_layout(folder)
    loaders = {"100k": _load_100k, "1m": _load_1m, "latest": _load_latest}
    if layout is None:
        raise ValueError(f"{folder}: not a MovieLens folder (expected u.data+u.item, ratings.dat+movies.dat or *.csv)")
    return loaders[layout](folder)


def _ratings(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.from_epoch(pl.col("ts").cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC").alias("timestamp"),
        pl.lit("rating").alias("event_type"),
        pl.col("rating").cast(pl.Float64).alias("value"),
    )


def _read_dat(path: Path, columns: list[str]) -> pl.DataFrame:
    """The 1M ``::``-separated files (Latin-1); polars' CSV reader takes one-byte separators only."""
    text = path.read_bytes().decode("latin-1").replace("::", "\t")
    return pl.read_csv(
        io.StringIO(text), separator="\t", has_header=False, new_columns=columns, quote_char=None, infer_schema=False
    )


def _load_100k(folder: Path) -> Dataset:
    ratings = pl.read_csv(
        folder / "u.data", separator="\t", has_header=False, new_columns=["user_id", "item_id", "rating", "ts"]
    )
    item_cols = ["item_id", "title", "release", "video_release", "url", *ML100K_GENRES]
    raw = pl.read_csv(
        io.StringIO((folder / "u.item").read_bytes().decode("latin-1")),
        separator="|",
        has_header=False,
        new_columns=item_cols,
        quote_char=None,
        infer_schema=False,
    )
    genre_lists = raw.select(
        pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in ML100K_GENRES]).list.drop_nulls()
    ).to_series()
    items = pl.DataFrame(
        {
            "item_id": raw["item_id"],
            "title": raw["title"].str.strip_chars(),
            "description": pl.Series([None] * raw.height, dtype=pl.String),
            "genres": genre_lists.list.eval(pl.element().filter(pl.element() != "unknown")),
        }
    )
    users = None
    if (folder / "u.user").exists():
        users = pl.read_csv(
            folder / "u.user",
            separator="|",
            has_header=False,
            new_columns=["user_id", "age", "gender", "occupation", "zip_code"],
            infer_schema=False,
        ).drop("zip_code")
    return Dataset(_ratings(ratings), items, users)


def _load_1m(folder: Path) -> Dataset:
    ratings = _read_dat(folder / "ratings.dat", ["user_id", "item_id", "rating", "ts"])
    movies = _read_dat(folder / "movies.dat", ["item_id", "title", "genres"])
    items = movies.select(
        "item_id",
        pl.col("title").str.strip_chars(),
        pl.lit(None, pl.String).alias("description"),
        pl.col("genres").str.split("|"),
    )
    users = None
    if (folder / "users.dat").exists():
        raw = _read_dat(folder / "users.dat", ["user_id", "gender", "age", "occupation", "zip_code"])
        occupation = (
            pl.col("occupation")
            .cast(pl.Int64)
            .replace_strict(list(range(len(ML1M_OCCUPATIONS))), ML1M_OCCUPATIONS, default="other")
        )
        users = raw.select("user_id", "age", "gender", occupation.alias("occupation"))
    return Dataset(_ratings(ratings), items, users)


def _load_latest(folder: Path) -> Dataset:
    ratings = pl.read_csv(folder / "ratings.csv", infer_schema=False).rename(
        {"userId": "user_id", "movieId": "item_id", "timestamp": "ts"}
    )
    movies = pl.read_csv(folder / "movies.csv", infer_schema=False)
    items = movies.select(
        pl.col("movieId").alias("item_id"),
        pl.col("title").str.strip_chars(),
        pl.lit(None, pl.String).alias("description"),
        pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != "(no genres listed)")),
    )
    if (folder / "tags.csv").exists():
        tags = (
            pl.read_csv(folder / "tags.csv", infer_schema=False)
            .group_by("movieId")
            .agg(pl.col("tag").unique().sort().head(20).str.join(", ").alias("tags"))
        )
        items = (
            items.join(tags, left_on="item_id", right_on="movieId", how="left")
            .with_columns(pl.when(pl.col("tags").is_not_null()).then("Tags: " + pl.col("tags")).alias("description"))
            .drop("tags")
        )
    return Dataset(_ratings(ratings), items, None)
