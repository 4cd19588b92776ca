"""Hydra command line: `train(cfg)` behind scripts/train.py, the up-front config check, resume paths (needs the `hydra` extra)."""
