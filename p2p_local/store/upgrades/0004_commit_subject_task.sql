-- The commit task is a developer's commit subject, not pytest's: stored rows take the task's new name
-- (the old one stays an alias: p2p_local.data.format.TASK_ALIASES).
UPDATE items SET task = 'commit-subject' WHERE task = 'pytest-commit-subject';
UPDATE profiles SET task = 'commit-subject' WHERE task = 'pytest-commit-subject';
