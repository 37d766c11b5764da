-- 0006: a conversation's own settings in the chat: its system prompt (free chat's system message, after what
-- is known of the user) and its adapter strength (NULL: the chat's current one).
ALTER TABLE conversations ADD COLUMN system_prompt TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN scale REAL;
