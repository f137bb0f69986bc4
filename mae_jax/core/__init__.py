"""The shared training core: config checks, train state, step, loop, checkpoints, logging."""
