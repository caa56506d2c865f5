"""Benchmarks: the model profiler (profile.py), the memory probe (memprobe.py), the scan and SSD kernel
benches (scan.py, ssd.py) and the prepared GPU check (gpu_check.py)."""
