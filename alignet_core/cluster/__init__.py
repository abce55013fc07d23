"""Stage 2, cluster: k-means of the transformed embeddings into superordinate categories."""
