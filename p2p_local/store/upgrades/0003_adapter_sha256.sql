-- 0003: the adapter cache verifies what it serves: the sha256 of each cached file, recorded when it
-- is written and checked before it is used. NULL (rows from before this upgrade): not trusted, the
-- adapter is regenerated once on its next use.
ALTER TABLE adapters ADD COLUMN sha256 TEXT;
