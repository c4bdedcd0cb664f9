"""Scoring against instance labels: metrics (AJI, AHD, Dice, AJI+, PQ, F1), classical hematoxylin
baselines, the evaluation workflow's reports, and error analysis (where the AJI is lost)."""

from . import baselines, error_analysis, metrics, reports

__all__ = ["baselines", "error_analysis", "metrics", "reports"]
