"""The work of the model stages on one batch, as plain functions and classes with no Ray: what the runners of
:mod:`clipaudit.runtime` run inside their actors and what tests run in-process.

- :mod:`~clipaudit.batches.embed`: read, decode and preprocess images; encode images and captions.
- :mod:`~clipaudit.batches.tcac`: resize, transform and encode each image once per TCAC transform.
- :mod:`~clipaudit.batches.isolation`: split a failing batch down to the rows that fail alone, and tell a bad
  row from a lost node or a broken cluster.
"""
