"""A seeded demo shop: a catalogue of films with real-sounding titles and descriptions, and a year of events from
users with latent genre tastes and a popularity skew, so that good recommendations are visibly good.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

# Per genre: title words (adjective-ish, noun-ish) and description fragments (setting, protagonist, conflict).
GENRES: dict[str, dict[str, list[str]]] = {
    "Science Fiction": {
        "a": ["Last", "Silent", "Distant", "Quantum", "Broken", "Red", "Hollow", "Infinite"],
        "n": ["Orbit", "Signal", "Colony", "Horizon", "Star", "Machine", "Nebula", "Frontier"],
        "where": ["on a generation ship", "in a Mars colony", "aboard a derelict station", "in a city run by AI"],
        "who": ["a rookie pilot", "an android medic", "a disgraced engineer", "a xenobiologist"],
        "what": ["decodes a signal from deep space", "fights a rogue AI", "races to stop a reactor meltdown"],
    },
    "Fantasy": {
        "a": ["Crimson", "Forgotten", "Enchanted", "Iron", "Shadow", "Golden", "Wild", "Ancient"],
        "n": ["Crown", "Dragon", "Forest", "Sword", "Kingdom", "Witch", "Throne", "Oath"],
        "where": ["in a kingdom of floating islands", "beyond the northern wall", "in an enchanted forest"],
        "who": ["an apprentice mage", "an exiled princess", "a blacksmith's daughter", "a reluctant knight"],
        "what": ["hunts the last dragon", "breaks an ancient curse", "leads a rebellion against a tyrant king"],
    },
    "Mystery": {
        "a": ["Quiet", "Locked", "Missing", "Cold", "Hidden", "Final", "Pale", "Twelfth"],
        "n": ["Room", "Witness", "Letter", "Key", "Clue", "Manor", "Alibi", "Inheritance"],
        "where": ["in a sleepy seaside village", "at a snowed-in country manor", "on a night train to Vienna"],
        "who": ["a retired detective", "an amateur sleuth", "a sharp-eyed journalist", "a young constable"],
        "what": ["unravels a decades-old murder", "finds the heir who vanished", "exposes a forger"],
    },
    "Romance": {
        "a": ["Summer", "Second", "Sweet", "Unexpected", "Midnight", "Paper", "Lovely", "Endless"],
        "n": ["Kiss", "Letters", "Hearts", "Wedding", "Promise", "Season", "Dance", "Chance"],
        "where": ["in a Paris bakery", "at a Tuscan vineyard", "in a small bookshop in Maine"],
        "who": ["a wedding planner", "a widowed chef", "a travelling musician", "two rival architects"],
        "what": ["falls for the last person she expected", "gets a second chance at first love"],
    },
    "Thriller": {
        "a": ["Deadly", "Black", "Zero", "Rogue", "Burning", "Fatal", "Silent", "Dark"],
        "n": ["Protocol", "Target", "Hour", "Agent", "Conspiracy", "Code", "Exchange", "Pursuit"],
        "where": ["across Cold War Berlin", "inside a hijacked airliner", "in the back rooms of Washington"],
        "who": ["a burned spy", "an ex-marine", "a hacker on the run", "a federal prosecutor"],
        "what": ["uncovers a plot to topple the government", "has 24 hours to find a stolen warhead"],
    },
    "Comedy": {
        "a": ["Big", "Crazy", "Awkward", "Lucky", "Accidental", "Totally", "Happy", "Weird"],
        "n": ["Weekend", "Roommates", "Vacation", "Boss", "Neighbours", "Road Trip", "Family", "Party"],
        "where": ["at a chaotic family reunion", "in a failing startup", "on a road trip across Texas"],
        "who": ["two hapless best friends", "an overconfident intern", "a nervous groom", "a grumpy dad"],
        "what": ["tries to fake a perfect life", "must win back a lost bet", "accidentally becomes famous"],
    },
    "Horror": {
        "a": ["Haunted", "Hungry", "Dead", "Bleeding", "Cursed", "Hollow", "Crawling", "Screaming"],
        "n": ["House", "Woods", "Lake", "Doll", "Cellar", "Asylum", "Mirror", "Night"],
        "where": ["in an abandoned asylum", "at a cabin deep in the woods", "in a town where nobody sleeps"],
        "who": ["a group of college friends", "a grieving mother", "a paranormal investigator"],
        "what": ["awakens something that should stay buried", "is hunted by a creature in the dark"],
    },
    "Documentary": {
        "a": ["Hidden", "Blue", "Wild", "True", "Secret", "Living", "Frozen", "Human"],
        "n": ["Planet", "Oceans", "Story", "Lives", "Food", "Cities", "Earth", "Mind"],
        "where": ["across six continents", "beneath the Arctic ice", "inside the world's busiest kitchens"],
        "who": ["a wildlife crew", "scientists and farmers", "a team of free divers", "historians"],
        "what": ["follows a year in the life of a coral reef", "explains how cities feed themselves"],
    },
    "Animation": {
        "a": ["Little", "Brave", "Magic", "Tiny", "Flying", "Funny", "Clever", "Sleepy"],
        "n": ["Fox", "Robot", "Penguin", "Cloud", "Bear", "Adventure", "Island", "Friends"],
        "where": ["in a candy-coloured kingdom", "under the sea", "in a toy shop after closing time"],
        "who": ["a shy little fox", "a lost robot", "a penguin who wants to fly", "a curious girl"],
        "what": ["goes on a journey to find home", "learns the value of friendship"],
    },
    "Western": {
        "a": ["Dusty", "Lonesome", "High", "Rusty", "Outlaw", "Long", "Wild", "Last"],
        "n": ["Trail", "Gun", "Ranch", "Sheriff", "Canyon", "Frontier", "Rider", "Noon"],
        "where": ["in 1870s Wyoming", "along the Santa Fe trail", "in a border town"],
        "who": ["a lone gunslinger", "a widowed rancher", "a bounty hunter", "a young sheriff"],
        "what": ["stands up to a ruthless cattle baron", "rides out for revenge"],
    },
    "Crime": {
        "a": ["Dirty", "Blood", "Sharp", "Cold", "Easy", "Bad", "Street", "Big"],
        "n": ["Money", "Heist", "City", "Streets", "Family", "Deal", "Score", "Job"],
        "where": ["in 1970s New York", "in the docks of Marseille", "in a Chicago precinct"],
        "who": ["a veteran safecracker", "an undercover cop", "a mob accountant", "a getaway driver"],
        "what": ["plans one last heist", "turns informant against the family"],
    },
    "History": {
        "a": ["Great", "Last", "Iron", "Lost", "Imperial", "Forgotten", "Brave", "First"],
        "n": ["Empire", "War", "Queen", "Revolution", "Armada", "Legion", "Voyage", "Dynasty"],
        "where": ["in ancient Rome", "during the Napoleonic wars", "in Tudor England", "on the Silk Road"],
        "who": ["a young general", "a queen", "a cartographer", "a foot soldier"],
        "what": ["changes the fate of an empire", "survives the fall of a dynasty"],
    },
}
EVENT_TYPES = ("view", "click", "like", "purchase")
EVENT_PROBS = (0.55, 0.25, 0.12, 0.08)


@dataclass(frozen=True)
class DemoSpec:
    users: int = 2000
    items: int = 3000
    events: int = 120_000
    days: int = 365
    end: dt.date = dt.date(2026, 11, 21)  # last day with events (inclusive)
    bad_row_fraction: float = 0.002  # a few broken rows, so the demo shows the quarantine
    seed: int = 7


def generate(spec: DemoSpec) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(events, items, users) as typed frames; events carry text timestamps like a real log export."""
    rng = np.random.default_rng(spec.seed)
    items, item_genre = _catalogue(rng, spec.items)
    users, taste = _users(rng, spec.users)
    events = _events(rng, spec, item_genre, taste)
    return events, items, users


def _catalogue(rng: np.random.Generator, n: int) -> tuple[pl.DataFrame, np.ndarray]:
    names = list(GENRES)
    primary = rng.integers(0, len(names), size=n)
    titles, descriptions, genres, seen = [], [], [], set()
    for i, g in enumerate(primary):
        words = GENRES[names[g]]
        title = f"The {rng.choice(words['a'])} {rng.choice(words['n'])}"
        if title in seen:  # keep titles unique, as a real catalogue mostly is
            title = f"{title} {['II', 'III', 'Returns', 'Rising', 'Reborn'][i % 5]}"
        if title in seen:
            title = f"{title} ({1960 + int(rng.integers(0, 66))})"
        seen.add(title)
        second = rng.integers(0, len(names)) if rng.random() < 0.35 else g
        genres.append(sorted({names[g], names[second]}))
        descriptions.append(
            f"{_upper_first(rng.choice(words['where']))}, {rng.choice(words['who'])} {rng.choice(words['what'])}."
        )
        titles.append(title)
    items = pl.DataFrame(
        {
            "item_id": [f"m{i:05d}" for i in range(n)],
            "title": titles,
            "description": descriptions,
            "genres": ["|".join(g) for g in genres],
        }
    )
    return items, primary


def _users(rng: np.random.Generator, n: int) -> tuple[pl.DataFrame, np.ndarray]:
    n_genres = len(GENRES)
    taste = rng.dirichlet(np.full(n_genres, 0.25), size=n)  # most users love 1-3 genres
    ages = rng.integers(16, 75, size=n)
    countries = rng.choice(["US", "UK", "DE", "FR", "IN", "BR", "JP"], size=n)
    users = pl.DataFrame(
        {"user_id": [f"u{u:05d}" for u in range(n)], "age": ages.astype(str), "country": countries.astype(str)}
    )
    return users, taste


def _events(rng: np.random.Generator, spec: DemoSpec, item_genre: np.ndarray, taste: np.ndarray) -> pl.DataFrame:
    n_genres = taste.shape[1]
    # Zipf-like popularity within each genre: a few hits, a long tail.
    popularity = rng.pareto(1.2, size=len(item_genre)) + 1.0
    by_genre = [np.flatnonzero(item_genre == g) for g in range(n_genres)]
    genre_probs = [popularity[ix] / popularity[ix].sum() for ix in by_genre]
    activity = rng.lognormal(0.0, 1.0, size=taste.shape[0])
    counts = np.maximum(1, rng.multinomial(spec.events, activity / activity.sum()))
    user_idx = np.repeat(np.arange(taste.shape[0]), counts)
    # Choose a genre per event from the user's taste, with a little exploration, then an item by popularity.
    explore = rng.random(len(user_idx)) < 0.1
    cum = np.cumsum(taste[user_idx], axis=1)
    genre = (rng.random((len(user_idx), 1)) < cum).argmax(axis=1)
    genre[explore] = rng.integers(0, n_genres, size=int(explore.sum()))
    item_idx = np.empty(len(user_idx), dtype=np.int64)
    for g in range(n_genres):
        mask = genre == g
        item_idx[mask] = rng.choice(by_genre[g], size=int(mask.sum()), p=genre_probs[g])
    start = dt.datetime.combine(spec.end - dt.timedelta(days=spec.days - 1), dt.time(), tzinfo=dt.UTC)
    seconds = rng.integers(0, spec.days * 86400, size=len(user_idx))
    stamps = [(start + dt.timedelta(seconds=int(s))).isoformat().replace("+00:00", "Z") for s in seconds]
    kinds = rng.choice(EVENT_TYPES, size=len(user_idx), p=EVENT_PROBS)
    events = pl.DataFrame(
        {
            "user_id": [f"u{u:05d}" for u in user_idx],
            "item_id": [f"m{i:05d}" for i in item_idx],
            "timestamp": stamps,
            "event_type": kinds.astype(str),
        }
    )
    return _with_bad_rows(rng, events, spec.bad_row_fraction)


def _with_bad_rows(rng: np.random.Generator, events: pl.DataFrame, fraction: float) -> pl.DataFrame:
    n_bad = int(events.height * fraction)
    if n_bad == 0:
        return events
    rows = rng.choice(events.height, size=n_bad, replace=False)
    broken = events[rows.tolist()]
    kind = np.arange(n_bad) % 3
    broken = broken.with_columns(
        pl.when(pl.Series(kind == 0)).then(pl.lit(None)).otherwise(pl.col("user_id")).alias("user_id"),
        pl.when(pl.Series(kind == 1)).then(pl.lit("yesterday-ish")).otherwise(pl.col("timestamp")).alias("timestamp"),
        pl.when(pl.Series(kind == 2)).then(pl.lit("teleport")).otherwise(pl.col("event_type")).alias("event_type"),
    )
    return pl.concat([events, broken]).sort("timestamp")


def write_demo_files(folder: Path, spec: DemoSpec, chunk_users: int | None = None) -> dict[str, Path]:
    """Write events.csv, items.jsonl and users.csv (two formats, as real exports come) and return their paths.

    With ``chunk_users`` the users and their events are generated and written one chunk of users at a time
    (``events/events-NNNNN.csv``, one file per chunk, and ``users.csv`` appended), so memory stays bounded by a
    chunk at any scale; ``paths["events"]`` is then that folder. The chunked output is seeded too, but it is a
    different draw from the unchunked one.
    """
    if chunk_users is not None:
        return write_demo_files_chunked(folder, spec, chunk_users)
    folder.mkdir(parents=True, exist_ok=True)
    events, items, users = generate(spec)
    paths = {"events": folder / "events.csv", "items": folder / "items.jsonl", "users": folder / "users.csv"}
    events.write_csv(paths["events"])
    items.write_ndjson(paths["items"])
    users.write_csv(paths["users"])
    return paths


def write_demo_files_chunked(folder: Path, spec: DemoSpec, chunk_users: int = 100_000) -> dict[str, Path]:
    """The scale path of :func:`write_demo_files`: vectorised, one chunk of users in memory at a time."""
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be positive, got {chunk_users}")
    folder.mkdir(parents=True, exist_ok=True)
    events_dir = folder / "events"
    events_dir.mkdir(exist_ok=True)
    for stale in events_dir.glob("events-*.csv"):  # a rerun with a bigger chunk must not leave extra files behind
        stale.unlink()
    rng = np.random.default_rng(spec.seed)
    items, item_genre = _catalogue(rng, spec.items)
    popularity = rng.pareto(1.2, size=len(item_genre)) + 1.0
    by_genre = [np.flatnonzero(item_genre == g) for g in range(len(GENRES))]
    genre_probs = [popularity[ix] / popularity[ix].sum() for ix in by_genre]
    paths = {"events": events_dir, "items": folder / "items.jsonl", "users": folder / "users.csv"}
    items.write_ndjson(paths["items"])
    with open(paths["users"], "wb") as users_out:
        for chunk, first in enumerate(range(0, spec.users, chunk_users)):
            n = min(chunk_users, spec.users - first)
            chunk_rng = np.random.default_rng([spec.seed, chunk])
            users, taste = _users(chunk_rng, n)
            users = users.with_columns(_ids("u", pl.Series(np.arange(first, first + n))).alias("user_id"))
            users.write_csv(users_out, include_header=chunk == 0)
            n_events = round(spec.events * n / spec.users)
            events = _chunk_events(chunk_rng, spec, n_events, first, taste, by_genre, genre_probs)
            events.write_csv(events_dir / f"events-{chunk:05d}.csv")
    return paths


def _ids(prefix: str, numbers: pl.Series) -> pl.Expr:
    """Vectorised f"{prefix}{n:05d}" (the unchunked generator's id format)."""
    return pl.lit(prefix) + pl.lit(numbers).cast(pl.String).str.zfill(5)


def _chunk_events(
    rng: np.random.Generator,
    spec: DemoSpec,
    n_events: int,
    first_user: int,
    taste: np.ndarray,
    by_genre: list[np.ndarray],
    genre_probs: list[np.ndarray],
) -> pl.DataFrame:
    """One chunk's events, the same generative story as :func:`_events` without per-row Python."""
    n_users, n_genres = taste.shape
    activity = rng.lognormal(0.0, 1.0, size=n_users)
    counts = np.maximum(1, rng.multinomial(n_events, activity / activity.sum()))
    user_idx = np.repeat(np.arange(n_users), counts)
    explore = rng.random(len(user_idx)) < 0.1
    genre = (rng.random((len(user_idx), 1)) < np.cumsum(taste, axis=1)[user_idx]).argmax(axis=1)
    genre[explore] = rng.integers(0, n_genres, size=int(explore.sum()))
    item_idx = np.empty(len(user_idx), dtype=np.int64)
    for g in range(n_genres):
        mask = genre == g
        item_idx[mask] = rng.choice(by_genre[g], size=int(mask.sum()), p=genre_probs[g])
    start = dt.datetime.combine(spec.end - dt.timedelta(days=spec.days - 1), dt.time(), tzinfo=dt.UTC)
    seconds = int(start.timestamp()) + rng.integers(0, spec.days * 86400, size=len(user_idx))
    kinds = rng.choice(EVENT_TYPES, size=len(user_idx), p=EVENT_PROBS)
    events = pl.DataFrame({"u": user_idx + first_user, "i": item_idx, "s": seconds, "event_type": kinds.astype(str)})
    events = events.select(
        (pl.lit("u") + pl.col("u").cast(pl.String).str.zfill(5)).alias("user_id"),
        (pl.lit("m") + pl.col("i").cast(pl.String).str.zfill(5)).alias("item_id"),
        pl.from_epoch("s", time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("timestamp"),
        "event_type",
    )
    return _with_bad_rows(rng, events, spec.bad_row_fraction)


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# The demo catalogue the offline protocol evaluates on: 1.5 times the demo night's users and events.
PROTOCOL_SPEC = DemoSpec(users=3000, items=3000, events=180_000)
# The model issue's cost target: the demo generator at 400,000 events (its users and items scaled alike).
COST_SPEC = DemoSpec(users=6700, items=6700, events=400_000)


def dataset(spec: DemoSpec = PROTOCOL_SPEC):
    """The demo catalogue as typed frames for the offline protocol (no bad rows; timestamps parsed, genres split)."""
    from nightrec.sources.movielens import Dataset

    events, items, users = generate(dataclasses.replace(spec, bad_row_fraction=0.0))
    events = events.with_columns(pl.col("timestamp").str.to_datetime(time_zone="UTC", time_unit="us"))
    items = items.with_columns(pl.col("genres").str.split("|"))
    return Dataset(events=events, items=items, users=users)
