"""Model sets a user can get: the catalogue, and their downloads from the Hugging Face hub.

``catalogue`` (the data: which repositories and files each set needs), ``store`` (download with
progress and resume, verify, remove, and what is installed where) and ``cli`` (``python -m
backend models``). Torch-free: the server and the command line use it before any model loads.
"""
