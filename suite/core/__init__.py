"""The suite's base layer: what a case and a record are (imported by every other layer)."""
