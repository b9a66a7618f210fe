from setuptools import find_packages, setup

setup(
    name="diffit-kernels",
    version="0.1.0",
    description="Triton kernels (forward and backward) for DiffiT diffusion vision transformers, "
    "with a plain-PyTorch reference and a DiffiT model that uses them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["diffit_kernels", "diffit_kernels.*", "diffit", "diffit.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.4", "einops", "numpy", "packaging"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",
            "matplotlib",
            "packaging",
            "safetensors",
            "scikit-learn",
            "pillow",
            "tqdm",
        ],
        "vae": ["diffusers", "safetensors"],
        # python -m diffit train / demo: digits, image folders, plots, progress bar
        "train": ["matplotlib", "pillow", "scikit-learn", "tqdm"],
    },
)
