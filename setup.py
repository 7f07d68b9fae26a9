from setuptools import setup

setup(
    name="nnunet-diffusion",
    version="0.1.0",
    description="Mask-predicting 3D diffusion segmentation (Fu et al. 2023) as an nnU-Net v2 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # the thin trainer modules live in the top-level trainers/ folder and install as
    # nnunet_diffusion.trainers, a folder of their own (what nnUNet_extTrainer points at)
    packages=["nnunet_diffusion", "nnunet_diffusion.trainers"],
    package_dir={"nnunet_diffusion": "nnunet_diffusion", "nnunet_diffusion.trainers": "trainers"},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch",
        "numpy",
        "scipy",
        "SimpleITK",
        "batchgenerators",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": [
        "nnunet-diffusion=nnunet_diffusion.cli:main",
        "nnUNetv2_predict_diffusion=nnunet_diffusion.predict_cli:main",
    ]},
)
