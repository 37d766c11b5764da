-- requires: fts5
-- 0002: full-text search over chat messages (FTS5, external content: the text lives once, in messages).
-- Skipped (and retried on a later open) where this SQLite has no FTS5; search then falls back to LIKE.

CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id');

-- Keep the index in step with the table.
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;

-- Index the messages written before this upgrade.
INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
