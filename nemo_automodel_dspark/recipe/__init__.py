"""The training recipe: typed config, distributed wrapping, train step, metrics, checkpoints."""
