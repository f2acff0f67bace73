"""Pretraining benchmark for lowrank_optim: LLaMA configs, data pipeline, optimizer factory, training loop.

Run `python -m benchmarks.pretrain --help`.
"""
