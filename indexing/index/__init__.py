"""The index room: planning, building, refreshing, tuning, validating and publishing index versions. Imports the
embedding room (snapshots) and the search room (the index format, and recall measured through the library)."""
