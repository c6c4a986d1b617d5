"""Data sources: the seeded demo generator and adapters for public dataset layouts."""
