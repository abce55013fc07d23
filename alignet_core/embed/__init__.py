"""Stage 0, embed: the teacher's pooled pre-logits of every image, into a resumable Zarr store."""
