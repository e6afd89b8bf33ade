"""The experiment trackers a job's `integrations` name (workers/tracking.py drives them); each
imports its package only when a job uses it (the `trackers` extra)."""
