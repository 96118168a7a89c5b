"""Optional integrations with training frameworks; each module imports its framework.

- :mod:`sparsity_ext.integrations.lightning`: ``SparsityCallback`` for PyTorch Lightning
  (``pip install "sparsity_ext[lightning]"``).
"""
