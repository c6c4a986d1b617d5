"""Where bytes live: lake layout, Arrow schemas, atomic file and partition writes. Imports nothing of ours above it."""
