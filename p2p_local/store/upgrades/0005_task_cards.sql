-- 0005: a user's own task cards (`p2p profile create NAME --task-card FILE`), keyed by task name: a task no
-- built-in card names finds its card here (store/task_cards.py). `card` is the card's JSON (TaskCard.to_dict).
CREATE TABLE task_cards (
    name TEXT PRIMARY KEY,
    card TEXT NOT NULL,
    created REAL NOT NULL
);
