"""Prepare functions for the memprobe tests (each returns one step; see ssmscale.memprobe)."""

import time

import torch


def touch(mib):
    def step():
        torch.ones(mib * 2**20 // 4)   # mib MiB, every page written
    return step


def too_big():
    return lambda: torch.empty(2**60, dtype=torch.uint8)


def raises():
    def step():
        raise ValueError("d_inner must be even")
    return step


def sleeps(seconds):
    return lambda: time.sleep(seconds)
