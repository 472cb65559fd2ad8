"""The run report: one self-contained HTML page with its thumbnails and charts, ``summary.json`` for machines, and
``clipaudit diff`` between two runs.

- :mod:`clipaudit.report.summary`: :class:`~clipaudit.report.summary.RunView` (a run directory, or a finished run
  of it read back through its LanceDB tags) and :func:`~clipaudit.report.summary.build_summary`.
- :mod:`clipaudit.report.render`: :class:`~clipaudit.report.render.ReportBuilder`, the HTML page.
- :mod:`clipaudit.report.images`: thumbnails, TCAC images re-created from their recorded parameters.
- :mod:`clipaudit.report.charts`: matplotlib (Agg) charts as PNG.
- :mod:`clipaudit.report.html`: the escaping HTML builder.
- :mod:`clipaudit.report.diff`: what changed between two runs.

Nothing here imports matplotlib, torch or lancedb at module import.
"""
