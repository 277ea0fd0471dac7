"""Side-by-side benchmarks against the peers (`lorakit bench`): same model, batch, dtype, seed and
threads in one run, repetitions alternating, memory measured per side in its own process.

This package is the only place where PEFT and bitsandbytes are imported (lazily, as references).
"""
