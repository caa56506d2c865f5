"""Kernels, each with its slow reference beside it: the selective scan and Mamba-2's SSD live here."""

from .scan import available_impls, register_impl, selective_scan
from .scan_ref import selective_scan_ref
from .ssd import ssd
from .ssd_ref import ssd_ref

__all__ = ["selective_scan", "selective_scan_ref", "available_impls", "register_impl", "ssd", "ssd_ref"]
