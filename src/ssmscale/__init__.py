"""ssmscale: matched Transformer++ / Mamba scaling studies on one data path and one training loop.

Kept import-light on purpose: `ssmscale --help` must answer in about a second, so heavy libraries
(torch, lightning, datasets, matplotlib) are imported only by the modules that use them.
"""

__version__ = "0.1.0"
