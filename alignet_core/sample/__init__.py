"""Stage 3, sample: triplets sampled in shards, labelled by the transformed teacher, published as a dataset version."""
