"""Applications built on the package: mile-demo (the whole job on CPU) and mile-selfcheck."""
