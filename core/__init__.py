"""Infrastructure every stage shares: atomic files, checksums and manifest checks (`files`), strict typed
configs (`config`). It imports nothing of the stages above it."""
