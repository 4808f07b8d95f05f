"""The report stage: the papers' figures and tables from the evaluated models in MLflow, as
one self-contained HTML page plus CSV, Markdown and JSON.

- :mod:`~upstream.report.config`: the stage's config;
- :mod:`~upstream.report.runs`: the model runs as a table, one row per run;
- :mod:`~upstream.report.analysis`: curves, spread, effective robustness, comparisons (the
  statistics come from :mod:`upstream.analysis`);
- :mod:`~upstream.report.figures`: the plots;
- :mod:`~upstream.report.render`: CSV, Markdown, JSON and HTML;
- :mod:`~upstream.report.run`: one call, its checks, its files and its MLflow run.
"""

from upstream.report.config import ReportConfig
from upstream.report.run import report

__all__ = ["ReportConfig", "report"]
