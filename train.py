r"""MAE pretraining.

    python train.py --config=configs/cifar100_tiny.py [--workdir=DIR] [--config.key=value ...]

Re-running the same command resumes from the newest intact checkpoint in DIR (default
runs/<config>); add --config_change_ok to resume with changed hyperparameters (recorded in
DIR/config_history.jsonl). Several processes (one per host):

    JAX_COORDINATOR_ADDRESS=HOST0:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
        python train.py --config=... --multiprocess

Exit status: 0 completed, 75 pre-empted (saved; re-run to resume), 2 bad input, 3 diverged,
74 a checkpoint could not be written, 1 unexpected error (mae_jax/core/entry.py).
"""

from mae_jax.core.entry import run

if __name__ == "__main__":
    run("mae_jax.pretrain.lib", task="pretrain")
