"""The report: report.md and its figures, regenerated from a study folder alone. scaling.py writes it
(write_report: the scaling-law report, or recall.py's for a fixed-length study); one module per other
kind of section (trust.py, contrast.py, profile.py, provenance.py); figures.py and colors.py hold what
every figure shares."""
