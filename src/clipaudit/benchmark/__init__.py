"""From findings to a benchmark: ``clipaudit export`` writes what an audit found as a versioned folder
(:mod:`.export`, :mod:`.format`, :mod:`.card`), ``clipaudit score`` scores any image-text model on it
(:mod:`.score`, :mod:`.metrics`).

Importing this package is cheap; the modules load their heavy dependencies when used.
"""

from clipaudit.benchmark.format import FORMAT_VERSION, BenchmarkError

__all__ = ["FORMAT_VERSION", "BenchmarkError"]
