"""Stand-in for a transformers tests/ subpackage that the sdist does not ship (see ../README.md)."""
