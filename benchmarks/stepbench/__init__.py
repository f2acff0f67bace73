"""The parts of `python -m benchmarks.step_bench`: shapes, timing, the optimizers and their step measurement,
projector refresh, 8-bit / Triton kernel tables, the whole-model interleaved comparison, and the Markdown."""
