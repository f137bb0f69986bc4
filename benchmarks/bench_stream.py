"""The training stream's order alone, for a folder's listing: a full permutation per epoch
(`index_shuffle`, what folder sources use) vs the bounded shuffle buffer (what TFDS records
use), on ImageNet's 1,281,167 records, batch 256, no decoding. Rounds alternate the two.

    python benchmarks/bench_stream.py [--records N] [--rounds 2]

Prints a markdown table: records/s while streaming, and the seconds to a resumed stream's
first batch (start_step 2000): the permutation skips by arithmetic, the buffer refills.
"""

import argparse
import os
import platform
import time

import tensorflow as tf

from mae_jax.data.stream import shuffled_stream


def stream(records: int, indices: bool, start_step: int = 0):
    return iter(shuffled_stream(tf.data.Dataset.range(records), num_records=records,
                                batch_size=256, seed=0, process_index=0, indices=indices,
                                start_step=start_step).batch(256))


def records_per_second(records: int, indices: bool, take: int = 300_000) -> float:
    batches = stream(records, indices)
    next(batches)  # start-up (the buffer fills)
    start = time.perf_counter()
    for _ in range(take // 256):
        next(batches)
    return (take // 256) * 256 / (time.perf_counter() - start)


def resume_seconds(records: int, indices: bool) -> float:
    start = time.perf_counter()
    next(stream(records, indices, start_step=2000))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_281_167)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f} before, {args.records} records")
    print("| round | order | records/s | first batch of a resume at step 2000 |")
    print("|---|---|---|---|")
    for index in range(args.rounds):
        for indices, name in ((True, "permutation (folders)"), (False, "buffer (TFDS)")):
            rate = records_per_second(args.records, indices)
            print(f"| {index} | {name} | {rate / 1e3:.0f}k | "
                  f"{resume_seconds(args.records, indices):.2f} s |", flush=True)
    print(f"load {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
