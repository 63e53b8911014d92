"""Install: `pip install -e .` (add `[test]` for the test suite, `[interop]` for timm/HF)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "tensorflow-datasets>=4.9.8,<5",
    "grain>=0.2.12,<0.3",
    "array-record>=0.7",
    "etils[epath]>=1.10",
    # epath opens gs:// through fsspec's gcsfs when TensorFlow is absent.
    "gcsfs>=2024.6",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "opencv-python-headless>=4.9",
    "pillow>=10",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "psutil>=5.9",
    # jax.export serialization (python -m vit_jax.export).
    "flatbuffers>=24.3",
]

# Only for converting to / comparing with PyTorch models; never needed to train.
INTEROP_REQUIRES = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "timm>=1.0,<2",
    "transformers>=4.45,<6",
    "safetensors>=0.4",
]

setup(
    name="vit_jax",
    version="0.1.0",
    description="The Vision Transformer in JAX/Flax: models, checkpoints, sharded training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vit_jax", "vit_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # gcp-storage-emulator: a local GCS for the gs:// tests (no internet).
        "test": ["pytest>=8", "pytest-timeout>=2.3",
                 "gcp-storage-emulator>=2024.8.3"],
        "interop": INTEROP_REQUIRES,
    },
    license="Apache-2.0",
)
