"""One training run, whatever the pipeline: ``recipe.Run`` and its parts.

    recipe.py      Run: prepare -> the step loop -> wrap up (read this first)
    loop.py        StepLoop: a batch source -> Trainer.train_step -> observers
    observers.py   the Observer protocol and the run's observers (console, W&B, profiler, checkpoints)
    order.py       which samples each step trains (seeded order, token-budget plan)
    vocab.py       the run's vocab mapping file
    accounting.py  every record read is trained or skipped for a named reason

Nothing is imported here: ``export`` and the data cache use ``run.vocab`` without loading the run.
"""
