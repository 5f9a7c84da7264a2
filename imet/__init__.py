"""imet: a feature store plus lightweight heads for multi-label classification of museum objects."""

__version__ = "0.1.0"
