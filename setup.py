from setuptools import find_packages, setup

setup(
    name="pfedsim",
    version="0.1.0",
    description="Federated-learning simulator with personalization for PyTorch researchers",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["core", "core.*", "utils", "utils.*", "experiments", "experiments.*"]),
    py_modules=["e2e_trainer", "launch", "compare", "submit", "evaluate", "sweep"],
    package_data={"experiments": ["*/*.yaml", "*/*.md"]},
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pydantic>=2.5,<3",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        "dp-accounting>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7.4", "mypy>=1.8", "pytest-timeout>=2.2", "mpi4py>=3.1", "mpich>=4.1", "submitit>=1.5", "wandb>=0.16"],
        "mpi": ["mpi4py>=3.1", "mpich>=4.1"],
        "slurm": ["submitit>=1.5"],
        "wandb": ["wandb>=0.16"],
    },
)
