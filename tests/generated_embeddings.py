"""Small real embedding stores for clustering tests: Gaussian blobs written as the embedder writes them.

Free of FAISS and scikit-learn, so the GPU tests (`tests/gpu/`) can use it on a GPU image without them."""

from __future__ import annotations

import numpy as np

from alignet_core.io import embedding_store


def make_store(url: str, x: np.ndarray, valid: np.ndarray, chunk_rows: int = 64, dtype: str = "float32") -> str:
    """A real embedding store: invalid rows stay zero, as the embedder leaves them."""
    n, p = x.shape
    g = embedding_store.create_embedding_store(url, n, p, np.array([f"img{i:05d}" for i in range(n)]), dtype, chunk_rows, {"model": "test"})
    g["embeddings"][:] = np.where(valid[:, None], x, 0).astype(dtype)
    g["valid"][:] = valid
    return url


def blobs(n: int, k: int, p: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, p)) * 10
    labels = rng.integers(0, k, size=n)
    return (centers[labels] + spread * rng.normal(size=(n, p))).astype(np.float32), labels
