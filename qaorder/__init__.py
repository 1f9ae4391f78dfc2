"""qaorder package."""
