"""qarisk package."""
