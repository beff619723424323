"""The weight file (docs/FORMAT.md): weightfile.py reads and writes the container in pure
Python (no compiled code needed); store.py maps a model's graph and tensors to and from it."""
