"""Storage shared by every stage: paths, keys and manifests, embedding stores, image sources, file formats, locks."""
