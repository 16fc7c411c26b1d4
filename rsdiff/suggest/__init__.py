"""What to label next: per-tile uncertainty of unlabeled scenes, ranked and kept apart."""
