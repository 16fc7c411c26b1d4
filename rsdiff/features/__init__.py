"""Frozen multi-level DDPM features: block names, the extractor, the channel index and the table."""
