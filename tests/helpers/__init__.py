"""Shared test helpers: fakes, tiny models, test beds. Test modules import from here, never each other."""
