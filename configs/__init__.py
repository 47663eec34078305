"""Named presets (`framecast config list`), shipped as package data and read with importlib.resources."""
