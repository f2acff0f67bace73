from setuptools import find_packages, setup

setup(
    name="lowrank-optim",
    version="0.1.0",
    description="Memory-efficient low-rank optimizers for PyTorch: GaLore, Fira, FRUGAL, DCT and SST on one engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lowrank_optim", "lowrank_optim.*", "triton_kernels", "triton_kernels.*",
                                    "benchmarks", "benchmarks.*"]),
    package_data={"benchmarks": ["configs/*.json"]},
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "transformers>=4.40", "galore-torch==1.0", "fira==1.0.2", "bitsandbytes>=0.50", "triton>=3.0"],
        "bench": ["transformers>=4.40", "tokenizers", "datasets", "tqdm", "matplotlib", "optuna", "bitsandbytes>=0.50"],
    },
)
