"""Export: a study's trained runs leave the tool in formats other tools load.

`export_run(run_dir, out_dir, fmt="hf")` writes a Hugging Face folder (config.json, model.safetensors,
generation_config.json, tokenizer files, ssmscale_export.json) that
`transformers.AutoModelForCausalLM` and `AutoTokenizer` load, for the transformer (Llama), Mamba and
Mamba-2 (Mamba2 or NemotronH); the hybrid is refused (hf.py says why). `best_run(study_dir, family)`
names the run of a study to export. transformers is an optional dependency (`pip install .[hf]`),
imported only when a model is exported.
"""

from .folder import FORMATS, export_run
from .run import best_run

__all__ = ["FORMATS", "export_run", "best_run"]
