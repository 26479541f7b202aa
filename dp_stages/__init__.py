"""dp_stages package."""
