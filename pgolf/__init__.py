"""pgolf: parameter golf training, compression, evaluation and submission tooling."""

__version__ = "0.1.0"
