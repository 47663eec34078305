"""Training data, trainer and evaluation of the embedded demo model (not used at run time)."""
