-- 0001: profiles, their items with a change history, the adapter cache, and chat conversations.
-- Times are unix seconds (REAL). JSON columns hold objects as text ('{}' when empty).

CREATE TABLE profiles (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: adapter dirs are named by id
    name          TEXT NOT NULL UNIQUE,
    task          TEXT,                            -- default task for new items (NULL: none)
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    adapter_stale INTEGER NOT NULL DEFAULT 1       -- 1 once items changed since the last adapter
);

CREATE TABLE items (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: item_history refers to ids
    profile_id INTEGER NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
    task       TEXT NOT NULL,
    time       REAL,                               -- when it happened (NULL: unknown)
    input      TEXT NOT NULL,
    output     TEXT NOT NULL,
    meta       TEXT NOT NULL DEFAULT '{}',
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
-- Every listing is "this profile's items in time order", with or without a task filter; both
-- indexes let LIMIT queries and counts stay bounded on 100k-item profiles.
CREATE INDEX items_by_profile_time ON items(profile_id, time, id);
CREATE INDEX items_by_profile_task_time ON items(profile_id, task, time, id);

-- No foreign key to items: the history of a deleted item outlives it (until the profile is forgotten).
CREATE TABLE item_history (
    id         INTEGER PRIMARY KEY,
    item_id    INTEGER NOT NULL,
    profile_id INTEGER NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
    action     TEXT NOT NULL CHECK (action IN ('add', 'edit', 'delete')),
    old        TEXT,                               -- JSON of the item before (NULL for add)
    new        TEXT,                               -- JSON of the item after (NULL for delete)
    at         REAL NOT NULL
);
CREATE INDEX item_history_by_item ON item_history(item_id, id);
CREATE INDEX item_history_by_profile ON item_history(profile_id);

-- Cache of generated adapters: one file per (profile fingerprint, hypernetwork bundle).
CREATE TABLE adapters (
    id          INTEGER PRIMARY KEY,
    profile_id  INTEGER NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    bundle_hash TEXT NOT NULL,
    path        TEXT NOT NULL,
    created     REAL NOT NULL,
    UNIQUE (profile_id, fingerprint, bundle_hash)
);

CREATE TABLE conversations (
    id         INTEGER PRIMARY KEY,
    profile_id INTEGER REFERENCES profiles(id) ON DELETE CASCADE,   -- NULL: chat with the base model
    title      TEXT NOT NULL DEFAULT '',
    created    REAL NOT NULL
);
CREATE INDEX conversations_by_profile ON conversations(profile_id, id);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    meta            TEXT NOT NULL DEFAULT '{}',    -- e.g. {"adapter": ..., "scale": 1.0, "mode": "personalized"}
    created         REAL NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
