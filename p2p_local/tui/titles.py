"""A bare movie title ("Frozen") completed to the task's input ("Frozen (2013) | Genres: ...") from the
movies the store already holds: the profile's own rated items first, then the other profiles'. Nothing is
looked up anywhere else. Matching is `p2p_local.importers`' (case, punctuation and articles ignored:
"Matrix" finds "Matrix, The (1999)"); a year, when typed, narrows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p_local.data.format import TaskCard
from p2p_local.data.records import movie_item
from p2p_local.importers import normal_title, split_title_year, title_index
from p2p_local.store import Store

MAX_MATCHES = 12  # offered in the picker


@dataclass(frozen=True)
class Movie:
    title: str  # "Frozen (2013)"
    genres: tuple[str, ...]

    @property
    def text(self) -> str:
        """The task input, as the importers and the converter write it."""
        return movie_item(self.title, list(self.genres), 0)[0]


def needs_completion(card: TaskCard | None, text: str) -> bool:
    """A typed query the card would read without its metadata (a movie without its genres), one line."""
    if card is None or "genres" not in card.input_fields or "\n" in text.strip():
        return False
    return card.input_meta(text) == {} and bool(text.strip())


class Catalogue:
    """normal title -> movies, built from the store's items of one task (rebuilt when the store changes)."""

    def __init__(self, store: Store, card: TaskCard) -> None:
        self.store, self.task = store, card.name
        self.after = card.input_fields["genres"]["after"]  # where a stored input's genres begin
        self._key: tuple | None = None
        self._index: dict[str, list[tuple[str, int, str, list[str]]]] = {}

    def index(self, first: str | None) -> dict[str, list[tuple[str, int, str, list[str]]]]:
        profiles = self.store.profiles.list_profiles()
        key = (first, tuple((p.name, p.n_items, p.updated) for p in profiles))
        if key != self._key:
            order = sorted(profiles, key=lambda p: p.name != first)  # the profile's own items first
            genres_of: dict[str, str] = {}  # the first item read of each title
            for p in order:
                for it in self.store.profiles.items(p.name, task=self.task):
                    title, _, genres = it.input.partition(self.after)
                    if title:
                        genres_of.setdefault(title, genres)
            movies = {i: (title.strip(), [g for g in genres.split("|") if g and g != "unknown"])
                      for i, (title, genres) in enumerate(genres_of.items())}
            self._index, self._key = title_index(movies), key
        return self._index

    def lookup(self, text: str, profile: str | None = None) -> list[Movie]:
        """The movies `text` may mean: exact title matches (one year off allowed when a year is typed),
        else titles that begin with the typed words. Empty: nothing known by that name."""
        names, year = split_title_year(text.strip())
        if not names:
            return []
        index = self.index(profile)
        want = normal_title(names[0])
        found = list(index.get(want, []))
        if not found and want:
            found = [f for k, fs in index.items() if k.startswith(want + " ") for f in fs]
        if year:
            exact = [f for f in found if f[0] == year]
            found = exact or [f for f in found if f[0].isdigit() and abs(int(f[0]) - int(year)) <= 1]
        ordered = sorted(found, key=lambda f: f[1])  # the order read: own items first
        return list(dict.fromkeys(Movie(title, tuple(genres)) for _, _, title, genres in ordered))[:MAX_MATCHES]
