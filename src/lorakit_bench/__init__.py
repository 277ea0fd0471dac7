"""lorakit's benchmarks (`lorakit bench`): a tool package beside the library, not part of its data path.

Nothing in `lorakit` imports this package except the CLI's `bench` command. Side by side against the
peers: same model, batch, dtype, seed and threads in one run, repetitions alternating, memory measured
per side in its own process. This package is the only place where PEFT and bitsandbytes are imported
(lazily, as references).
"""
