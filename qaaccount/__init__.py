"""qaaccount package."""
