"""The demo profile: one real MovieLens user, so a newcomer sees personalization in the first minute.

`movielens-user76.jsonl` holds the 119 ratings of MovieLens ml-latest-small user 76 (a crime, horror
and thriller fan who rates animation, children's films and romance low) in the generic per-user
format. Data by GroupLens Research under the MovieLens terms (non-commercial; see NOTICE here);
cite F. Maxwell Harper and Joseph A. Konstan, 2015, The MovieLens Datasets: History and Context.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from p2p_local.store import Store

DEMO_PROFILE = "demo"
DEMO_TASK = "movielens-rating"
DEMO_FILE = "movielens-user76.jsonl"
# Ask these in the chat: the demo user loves the first, dislikes the second.
DEMO_QUESTIONS = (
    "Zodiac (2007) | Genres: Crime|Drama|Thriller",
    "Frozen (2013) | Genres: Adventure|Animation|Comedy|Fantasy|Musical|Romance",
)


def demo_path() -> Path:
    """The packaged demo users file."""
    return Path(str(resources.files("p2p_local.demo") / DEMO_FILE))


def import_demo(store: Store, name: str = DEMO_PROFILE) -> str:
    """Create profile `name` from the demo file unless it exists; returns the profile name."""
    from p2p_local.importers import import_file

    if not store.profiles.profile_exists(name):
        store.profiles.create_profile(name, task=DEMO_TASK)
        import_file(store, name, demo_path(), "jsonl", task=DEMO_TASK)
    return name
