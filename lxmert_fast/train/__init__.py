"""Training: the run's configuration, the one loop, its engines (DeepSpeed, one device), objectives, optimisers,
and the machinery under them (distributed, sampling, seeding, checkpoints, metrics).

Nothing here imports torch at import time of the package, so the commands' --help stays fast."""
