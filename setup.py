"""seedling: one JAX/Flax codebase for pretraining, fine-tuning and aligning language models."""

from setuptools import find_packages, setup

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
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.6'],
        # experiments/torch_baseline.py; on CPU-only hosts pin a CPU wheel (torch==2.13.0+cpu),
        # a plain torch requirement pulls gigabytes of CUDA packages.
        'bench': ['torch>=2.13'],
        # Hugging Face import/export tests; install torch==2.13.0 (CPU) first, as .ci/run does.
        'hf': ['transformers>=4.45', 'torch==2.13.0'],
    },
)
