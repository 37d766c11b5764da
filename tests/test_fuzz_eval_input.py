"""Fuzzing what `p2p eval --data --task-card` (and `p2p profile create --task-card`) read: any JSON value in any
task card field, any JSON on a users line. Each test asserts only this: a valid result whose every use works,
or a P2PError with a message and a hint; never another exception, never a hang (hypothesis' deadline).

Budgets as tests/test_fuzz_inputs.py: the `ci` profile by default, HYPOTHESIS_PROFILE=fuzz for thousands.
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_local.data.format import (
    MAX_TEMPLATE_CHARS,
    TaskCard,
    User,
    builtin_card,
    card_hash,
    check_outputs,
    read_users_jsonl,
)
from p2p_local.errors import P2PError

settings.register_profile("ci", max_examples=120, deadline=timedelta(seconds=5), derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=3000, deadline=timedelta(seconds=10),
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FIELDS = tuple(TaskCard.__dataclass_fields__)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                      st.sampled_from(["rating", "label", "generation", "users", "repository", "{input}", "Q: {input}",
                                       "{input:>99999999}", "{input.x}", "{", "1", " 1", "nan", "after", "split"]))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.sampled_from(["after", "split", "ignore", "genres", "x", ""]), kids, max_size=4), max_leaves=20)


def clean(e: P2PError) -> None:
    """What every refusal must carry: a message and a hint (the CLI prints both, nothing else)."""
    assert str(e.args[0]).strip() and e.hint, repr(e)


def works(card: TaskCard) -> None:
    """Every use of a card that passed: it prompts, hashes, reads a typed input, and round-trips as JSON."""
    assert len(card.prompt("x")) <= 4 * MAX_TEMPLATE_CHARS  # no padding spec blew it up
    assert len(card_hash(card)) == 16
    card.input_meta("a | Genres: b|c")
    text = json.dumps(card.to_dict(), allow_nan=False)  # a finite value_range, plain types
    assert TaskCard.from_dict(json.loads(text)) == card
    if card.value_range is not None:
        assert all(math.isfinite(v) for v in card.value_range) and card.value_range[0] < card.value_range[1]
    assert all(isinstance(x, str) and x == x.strip() and x for x in card.labels)


@given(st.sampled_from(FIELDS), json_value)
def test_fuzz_one_card_field(field: str, value: object) -> None:
    """A built-in card with one field set to any JSON value: a card every use of which works, or a DataError."""
    base = builtin_card("movielens-rating" if field in ("labels", "value_range") else "commit-subject").to_dict()
    try:
        card = TaskCard.from_dict(base | {field: value})
    except P2PError as e:
        clean(e)
        return
    works(card)


@given(st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=len(FIELDS)) | json_value)
def test_fuzz_whole_card(d: object) -> None:
    """Any JSON value as a card (each field any JSON value, or none): a card that works, or a DataError."""
    try:
        card = TaskCard.from_dict(d)
    except P2PError as e:
        clean(e)
        return
    works(card)


@given(st.binary(max_size=300) | st.builds(lambda v: json.dumps(v, allow_nan=True).encode(), json_value))
def test_fuzz_card_file(tmp_path_factory, raw: bytes) -> None:
    """Any bytes as a card file, as `--task-card` reads it."""
    path = tmp_path_factory.mktemp("card") / "card.json"
    path.write_bytes(raw)
    try:
        works(TaskCard.load(path))
    except P2PError as e:
        clean(e)


item = st.fixed_dictionaries({"input": json_value, "output": json_value},
                             optional={"time": json_value, "meta": json_value})
user = st.fixed_dictionaries({"user_id": json_value, "items": st.lists(item, max_size=3) | json_value})


@given(st.lists(user | json_value, max_size=4))
def test_fuzz_users_file(tmp_path_factory, lines: list) -> None:
    """Any JSON lines as a users file: users with finite, in-range times, unique ids and outputs the card's
    labels accept or refuse cleanly, or a DataError."""
    path = tmp_path_factory.mktemp("users") / "users.jsonl"
    path.write_text("\n".join(json.dumps(x, allow_nan=True) for x in lines))
    try:
        users = read_users_jsonl(path)
    except P2PError as e:
        clean(e)
        return
    assert len({u.user_id for u in users}) == len(users)
    for u in users:
        assert isinstance(u, User) and all(it.time is None or math.isfinite(it.time) for it in u.items)
    try:
        check_outputs(builtin_card("movielens-rating"), users, str(path))
    except P2PError as e:
        clean(e)
