"""The human data of a run: triplet files, the object ↔ image mapping, folds and splits, the taxonomy
proxy, abstraction levels, and VICE."""
