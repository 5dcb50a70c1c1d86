"""seedling: one JAX/Flax codebase for pretraining, fine-tuning and aligning language models."""

from setuptools import find_packages, setup

MKL = 'mkl>=2024; platform_machine == "x86_64"'

setup(
    name='seedling',
    version='0.1.0',
    description='Pure-functional JAX/Flax training and alignment recipes for language models.',
    python_requires='>=3.11',
    packages=find_packages(include=['model', 'model.*', 'train', 'train.*', 'align', 'align.*',
                                    'data', 'data.*', 'configs', 'configs.*', 'experiments',
                                    'experiments.*']),
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'sentencepiece>=0.2.0',
        'tensorflow-datasets>=4.9.10',
        'grain>=0.2.18',
        'ml-collections>=1.1.0',
        'tqdm',
        'tensorboardX>=2.6',
        'absl-py',
        'numpy',
    ],
    package_data={'model': ['host_gemm.cc']},   # built on first use of model.matmul_impl='blas'
    extras_require={
        # model.matmul_impl='blas': Intel MKL's sgemm on CPU (x86-64 wheels only).
        'cpu': [MKL],
        'test': ['pytest>=8', 'pytest-xdist>=3.6', MKL],
        # experiments/torch_baseline.py; on CPU-only hosts pin a CPU wheel (torch==2.13.0+cpu),
        # a plain torch requirement pulls gigabytes of CUDA packages.
        'bench': ['torch>=2.13', MKL],
        # Hugging Face import/export tests; install torch==2.13.0 (CPU) first, as .ci/run does.
        'hf': ['transformers>=4.45', 'torch==2.13.0'],
    },
)
