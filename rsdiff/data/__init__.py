"""Imagery I/O: scenes, class maps, tiling, band statistics, WebDataset shards and manifests."""
