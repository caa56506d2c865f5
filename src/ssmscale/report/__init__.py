"""The report: report.md and its figures, regenerated from a study folder alone (scaling.py: the
scaling-law report; trust.py, recall.py, contrast.py: its other kinds of section; colors.py)."""
