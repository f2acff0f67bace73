"""Shared pieces of the benchmark tests: a tiny local corpus and one torch thread for tiny CPU workloads."""

import os
import shutil
import sysconfig

import pytest
import torch

CORPUS_FILES = ["textwrap.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py", "copy.py"]


def make_corpus(directory, files=CORPUS_FILES):
    """A few stdlib modules: BPE training on them takes well under a second."""
    os.makedirs(directory, exist_ok=True)
    for f in files:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], f), os.path.join(directory, f))
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared 2-core machine OpenMP threads spin against other processes: one intra-op thread runs a 3-step
    llama_micro training in ~0.3 s instead of several seconds under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
