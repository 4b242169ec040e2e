"""Training: typed YAML recipes, the resumable trainer, its sampler, SyncBN and the run plots."""
