"""qamarket package."""
