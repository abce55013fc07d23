"""Model loading in one place: model names and weights (`refs`, no torch), the timm factory
(`factory`), the student and its checkpoints. Import the submodule you need: this package imports
nothing, so checking a model name never loads torch."""
