"""The application built on the operator library: data sets, models, the training loop,
outputs, plots, the benchmark harness and the ``sparsity-ext`` command line.

Needs the ``app`` extra (``pip install "sparsity_ext[app]"``); the core package
:mod:`sparsity_ext` needs none of it, and nothing in the core imports from here.
"""
