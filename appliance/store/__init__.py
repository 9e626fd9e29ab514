"""The store: TinyDB with atomic writes for the state, append-only logs for the history."""
