"""Packaging. The kernels (triton_kernels/) and the benchmarks (benchmarks/) live in top-level folders but are
installed under the project's name, as ``lowrank_optim.kernels`` and ``lowrank_optim.benchmarks``: installing
never claims the top-level names ``triton_kernels`` (Triton's own package) or ``benchmarks``.  In a source checkout
the same names resolve through the symbolic links lowrank_optim/kernels and lowrank_optim/benchmarks."""

from setuptools import find_packages, setup

MAPPED = {"lowrank_optim.kernels": "triton_kernels", "lowrank_optim.benchmarks": "benchmarks"}

core = find_packages(
    include=["lowrank_optim", "lowrank_optim.*"], exclude=[p for name in MAPPED for p in (name, name + ".*")]
)  # the links are not packages
mapped = [
    name + suffix for name, folder in MAPPED.items() for suffix in [""] + ["." + sub for sub in find_packages(folder)]
]

setup(
    name="lowrank-optim",
    version="0.1.0",
    description="Memory-efficient low-rank optimizers for PyTorch: GaLore, Fira, FRUGAL, DCT and SST on one engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=core + mapped,
    package_dir=dict(MAPPED),
    package_data={"lowrank_optim.benchmarks": ["configs/*.json"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest",
            "hypothesis",
            "transformers>=4.40",
            "accelerate",
            "galore-torch==1.0",
            "fira==1.0.2",
            "bitsandbytes>=0.50",
            "triton>=3.0",
            "apollo-torch==1.0.3",
            "ruff>=0.6",
        ],
        "bench": ["transformers>=4.40", "tokenizers", "datasets", "tqdm", "matplotlib", "optuna", "bitsandbytes>=0.50"],
    },
)
