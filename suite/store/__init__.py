"""Where records live: run folders (the source of truth), the history index, merging copies.
Imports suite.core only."""
