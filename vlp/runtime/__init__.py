"""The lowest layer: what every other layer may use and none above it owns.

Atomic, self-checking files (`atomic_file`), checkpoint files (`checkpoint`), stop signals and DataLoader
worker signal set-up (`preemption`), a run folder's lock (`lock`), whether a peer process lives (`peers`) and
the RNG streams of a process (`rng_state`). Nothing here imports vlp.train, vlp.data, vlp.eval or vlp.models.
"""
