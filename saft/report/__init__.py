"""Reporting: tables and pictures from finished runs' ``results.json`` (``python -m saft.report``)."""
