"""Upper bounds on every size a user can ask for: what can exist, with room to spare.

A value beyond these is a typo or an attack (`params: 1e300`), never a plan: the config schema and the
command-line arguments refuse it at once, naming the bound, so that no search, loop or allocation is
ever started for it. Imported by config.py and cli.py, so this module imports nothing heavy.
"""

MAX_PARAMS = 1e13        # non-embedding parameters: 5x the largest models trained to date; 40 TB of fp32 weights
MAX_WIDTH = 2 ** 16      # d_model, d_ff, head_dim, d_state, ...: the largest models are ~2.5e4 wide
MAX_LAYERS = 2 ** 13     # Mamba takes twice the transformer's layers; 1e13 parameters need ~1200
MAX_SEQ_LEN = 2 ** 24    # tokens per sequence
MAX_BATCH = 2 ** 24      # sequences per optimiser step
MAX_VOCAB = 2 ** 24      # tokenizer vocabulary
MAX_TOKENS = 1e15        # tokens of one run: 30x the largest training sets in use
MAX_FLOPS = 1e30         # FLOPs of one run: 1e5 x the largest training runs to date
MAX_BYTES = 2 ** 50      # corpus bytes (1 PiB)
MAX_SEED = 2 ** 63 - 1   # torch.manual_seed's range
MAX_COUNT = 2 ** 31      # any other count (examples, key-value pairs, steps between events, workers)
MAX_RUNS = 100_000       # runs one ladder plans (250x Chinchilla's 400 models): planned in seconds, minutes as sweep points
MAX_SECONDS = 1e7        # timeouts (about 4 months)
MAX_GB = 1e6             # memory limits, in GB
MAX_THREADS = 1024       # threads of one process (torch's, the fused kernels'): more than any one machine's cores
MAX_EVAL_EXAMPLES = 2 ** 16   # generated validation examples (MQAR): ~3 s to build; Zoology scores 3,000
# rows of a CSV to fit: a study has one per run (hundreds). Approach 3 fits every row from 4,500 starts: measured
# 47 CPU-s for 300 rows without bootstrap (a busy 2-core machine), so 10,000 rows take hours with it
MAX_FIT_ROWS = 10_000
