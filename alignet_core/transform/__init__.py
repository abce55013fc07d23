"""Stage 1, transform: the human-aligned affine transform of the teacher, fitted on odd-one-out triplets."""
