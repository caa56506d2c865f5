"""The study: an IsoFLOP ladder planned, trained and collected. ladder.py runs it (run_ladder); plan.py
plans the grid; tuning.py tunes learning rates and adds noise seeds; state.py keeps the study folder
(lock, results, resume); runner.py trains one planned run (worker.py: in a process of its own);
executors.py runs a round of them (in process, worker pool, submitit/Slurm); cost.py prices the plan."""
