"""Kernels, each with its slow reference beside it: the selective scan lives here."""

from .scan import available_impls, register_impl, selective_scan
from .scan_ref import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "available_impls", "register_impl"]
