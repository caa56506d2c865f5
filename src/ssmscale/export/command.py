"""`ssmscale export`: its arguments and handler (cli.py lists it). Importing this is light: the model,
torch and transformers load only when an export runs."""

from __future__ import annotations

from ..models.config import FAMILIES
from .folder import FORMATS


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a finished run (scaling/<study>/runs/<id>, with result.json and model.pt); "
                        "with --best, a study folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder to write")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: a Hugging Face transformers folder (AutoModelForCausalLM, AutoTokenizer)")
    p.add_argument("--best", metavar="FAMILY", choices=FAMILIES,
                   help="export the finished run of this family with the lowest validation loss in the study "
                        "folder RUN_DIR")


def run(args) -> int:
    from pathlib import Path

    from .folder import check_out_dir, export_run
    from .run import best_run
    check_out_dir(Path(args.out_dir))            # before the study is scanned
    run_dir = best_run(args.run_dir, args.best) if args.best else args.run_dir
    if args.best:
        print(f"best {args.best} run of {args.run_dir}: {run_dir}", flush=True)
    r = export_run(run_dir, args.out_dir, args.format, quiet=True)
    print(f"exported {r['run']} ({r['family']}, {r['tokenizer']} tokenizer) as {r['class']} to {r['out']}; "
          f"check: AutoModelForCausalLM logits on {r['check']['tokens'][0]} x {r['check']['tokens'][1]} tokens "
          f"equal the run's within {r['check']['max_rel_logit_diff']:.1e} (max relative difference)")
    return 0

