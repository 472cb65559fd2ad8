"""Input/output: one filesystem layer for every path, LanceDB tables, corpus readers."""
