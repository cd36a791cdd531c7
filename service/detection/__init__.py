"""Object detectors: what a detection looks like (base.py), D-RISE (drise.py), the zoo's detectors."""
