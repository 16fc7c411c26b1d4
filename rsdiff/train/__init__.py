"""DDPM pretraining: the shard stream, checkpoints, and the Ray Train loop."""
