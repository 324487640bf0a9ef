"""Packaging for diffusers-npu (src layout).

Install for development with ``pip install -e .[test]``. Extras:
  npu   -- torch_npu (Ascend; install the build matching your CANN toolkit)
  apex  -- NVIDIA apex (optional fused kernels)
  deepspeed -- DeepSpeed, for --distributed deepspeed (ZeRO 2/3)
  test  -- pytest and the packages the offline test-suite uses
"""
from setuptools import find_packages, setup

with open("requirements.txt") as f:
    # a requirement per line; "#" starts a comment (whole-line or trailing)
    install_requires = [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]

setup(
    name="diffusers-npu",
    version="0.1.0",
    description="Stable Diffusion fine-tuning and inference for Ascend NPUs, NVIDIA GPUs and CPU, "
    "as a library layer over Hugging Face diffusers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_npu": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require={
        "npu": ["torch_npu"],
        "apex": ["apex"],
        "lora": ["peft>=0.10"],
        "8bit": ["bitsandbytes"],
        "deepspeed": ["deepspeed"],
        "prodigy": ["prodigyopt"],
        "test": ["pytest>=7", "peft>=0.10", "prodigyopt"],
    },
    entry_points={"console_scripts": ["diffusers-npu=diffusers_npu.cli:main"]},
)
