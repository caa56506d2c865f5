"""The study: an IsoFLOP ladder planned, trained and collected (ladder.py), its compute estimate (cost.py),
its extra config axes (sweep.py) and the process one run trains in (worker.py)."""
