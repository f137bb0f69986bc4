"""What the multi-process agreements of the training loop cost: two local processes (CPU
backend, gloo collectives, 2 devices each), each call timed on process 0.

- `failing_together`: a block whose failure on any process reaches every process (one
  all-gather of exit statuses, read at once); the loop runs one per log step.
- `StopAgreement.check`: the stop flags' collective, queued and read at the next check (every
  5 steps in the loop). Timed here with every=1, so each read waits for the collective queued
  just before: an upper bound.
- `PreemptionGuard.requested_anywhere`: the blocking comparison of stop flags (log steps).

    python benchmarks/bench_process_agreement.py [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(process_id: int, address: str, calls: int, rounds: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=process_id)
    from mae_jax.core import preemption
    from mae_jax.core import sharding as sharding_lib
    from mae_jax.core.processes import failing_together

    mesh = sharding_lib.create_mesh(data=-1, fsdp=1, devices=jax.devices())
    agreement = preemption.StopAgreement(mesh, every=1)
    guard = preemption.PreemptionGuard()

    def block(step):
        with failing_together("timing"):
            pass

    kinds = {"failing_together block": block,
             "StopAgreement.check (every=1)": lambda step: agreement.check(step, False),
             "requested_anywhere": lambda step: guard.requested_anywhere()}
    for fn in kinds.values():  # compiles each collective once
        for step in range(10):
            fn(step)
    times = {name: [] for name in kinds}
    for _ in range(rounds):  # alternating kinds, round after round
        for name, fn in kinds.items():
            started = time.perf_counter()
            for step in range(calls):
                fn(step)
            times[name].append((time.perf_counter() - started) / calls * 1e3)
    if process_id == 0:
        print(f"\n| call | ms per call, {rounds} rounds of {calls} |\n|---|---|")
        for name, values in times.items():
            print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker >= 0:
        return worker(args.worker, args.address, args.calls, args.rounds)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    print(f"Load average before: {os.getloadavg()}; two processes, 2 CPU devices each, gloo")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", str(index), "--address",
                                 address, "--calls", str(args.calls), "--rounds",
                                 str(args.rounds)], env=env) for index in range(2)]
    if any(process.wait() for process in workers):
        raise SystemExit("a worker failed")
    print(f"Load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
