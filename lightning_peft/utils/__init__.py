"""Small shared helpers: atomic files and folders, fingerprints, names, runtime patching, parameter counts."""
