"""Training: the loops, optimizer set-up, distributed helpers and the checkpoint store."""
