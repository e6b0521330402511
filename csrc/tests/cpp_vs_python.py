"""CTest driver: moa_generate (examples/cpp, on moa_core) against the Python engine.

    cpp_vs_python.py write DATA_DIR          the fixture: a tiny random llama model, a MoA
                                             directory (two random PEFT experts made by PEFT, a
                                             random router), prompt files, and cases.json with
                                             the Python engine's ids for every case
    cpp_vs_python.py check DATA_DIR BINARY [--quick]
                                             runs BINARY (a moa_generate) on every case (with
                                             --quick, on a few) and compares its output with
                                             the Python engine's

The reference is moa_engine.Engine (the MoA directory read by moa_engine/moa_format.py,
tokens by the same C++ scheduler through the Python binding); moa_generate reads the model,
the directory and the prompts in C++ only. Cases: the base model, each expert, "base" with
experts loaded, routing with the directory's strategy and two overrides, seeded sampling,
streaming, and the exit status of a refused prompt and of a bad command line. Greedy and
seeded ids must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MAX_NEW = 12
SEED = 20240601


def write(data: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python_tests"))
    try:
        import moa_engine
    except ImportError as exc:
        sys.exit(
            f"cpp_vs_python.py: {sys.executable} cannot import moa_engine ({exc}); install the package first "
            "(pip install --no-build-isolation -e .), or configure CMake with -DPython3_EXECUTABLE=<its python>"
        )
    from tiny_models import build_model, save_model

    from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
    from moa_engine.testing import make_random_peft_adapter

    data.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model_dir, moa_dir = data / "model", data / "moa"
    base = build_model("llama_gqa", seed=SEED % 1000)
    save_model(base, model_dir)
    experts = {
        "code": make_random_peft_adapter(base, data / "peft" / "code", r=4, alpha=8, seed=1, init_scale=0.5),
        "math": make_random_peft_adapter(
            base,
            data / "peft" / "math",
            r=6,
            alpha=12,
            seed=2,
            init_scale=0.5,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 3},
        ),
    }
    gen = torch.Generator().manual_seed(SEED)
    cfg = base.config
    router = [torch.randn(2, cfg.hidden_size, generator=gen) * 3.0 for _ in range(cfg.num_hidden_layers)]
    config = MoAConfig(base_model=str(model_dir), domains=list(experts), router=RouterConfig(strategy="last"))
    MoADir.save(moa_dir, config, experts=experts, router=router, overwrite=True)

    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 1, 9)]
    (data / "prompts.txt").write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    (data / "prompts_commas.txt").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n\n")

    plain = moa_engine.Engine(model_dir)
    routed = {s: moa_engine.Engine(model_dir, experts=moa_dir, routing=s) for s in (None, "vote", "per_layer")}

    def ids(engine, **kw):
        return [c.token_ids for c in engine.generate(prompts, max_new_tokens=MAX_NEW, **kw)]

    common = ["--model", "{model}", "--max-new-tokens", str(MAX_NEW), "--file", "{data}/prompts.txt"]
    moa = [*common, "--moa", "{moa}"]
    sampling = dict(temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    cases = [
        ("base model, ragged batch", common, ids(plain)),
        ("base model, ignore EOS", [*common, "--ignore-eos"], ids(plain, ignore_eos=True)),
        ("expert code", [*moa, "--domain", "code"], ids(routed[None], domain="code")),
        ("expert math", [*moa, "--domain", "math"], ids(routed[None], domain="math")),
        ("base with experts loaded", [*moa, "--domain", "base"], ids(routed[None], domain="base")),
        ("routed, the directory's strategy", moa, ids(routed[None])),
        ("routed, vote", [*moa, "--routing", "vote"], ids(routed["vote"])),
        ("routed, per_layer", [*moa, "--routing", "per_layer"], ids(routed["per_layer"])),
        (
            "seeded sampling, expert code",
            [*moa, "--domain", "code", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "1234"],
            ids(routed[None], domain="code", **sampling),
        ),
        ("comma-separated ids, blank lines", [*common[:-1], "{data}/prompts_commas.txt"], ids(plain)),
    ]
    quick = {"expert code", "routed, vote"}  # with the stream and status cases: check --quick
    out = [{"name": n, "args": a, "expect": "ids", "ids": e, "quick": n in quick} for n, a, e in cases]
    [stream] = ids(routed[None], domain="math")[1:2]
    out.append(
        {
            "name": "stream one prompt",
            "expect": "stream",
            "ids": stream,
            "quick": True,
            "args": [
                "--model",
                "{model}",
                "--moa",
                "{moa}",
                "--domain",
                "math",
                "--max-new-tokens",
                str(MAX_NEW),
                "--ids",
                " ".join(map(str, prompts[1])),
                "--stream",
            ],
        }
    )
    out.append(
        {
            "name": "token outside the vocabulary",
            "expect": "status",
            "status": 1,
            "quick": True,
            "stderr": "outside the vocabulary",
            "args": ["--model", "{model}", "--ids", f"1 {cfg.vocab_size} 2"],
        }
    )
    out.append(
        {
            "name": "unknown domain",
            "expect": "status",
            "status": 1,
            "stderr": "unknown domain 'law'",
            "args": [*moa, "--domain", "law"],
        }
    )
    out.append(
        {
            "name": "bad command line",
            "expect": "status",
            "status": 2,
            "stderr": "usage:",
            "args": ["--ids", "1"],
            "quick": True,
        }
    )
    (data / "cases.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {len(out)} cases to {data / 'cases.json'}")


def check(data: Path, binary: str, quick: bool = False) -> int:
    cases = [c for c in json.loads((data / "cases.json").read_text()) if c.get("quick") or not quick]
    places = {"model": str(data / "model"), "moa": str(data / "moa"), "data": str(data)}
    failed = 0
    for case in cases:
        args = [a.format(**places) for a in case["args"]]
        run = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)
        problem = None
        if case["expect"] == "status":
            if run.returncode != case["status"] or case["stderr"] not in run.stderr:
                problem = f"expected exit {case['status']} with {case['stderr']!r} on stderr"
        elif run.returncode != 0:
            problem = "failed"
        elif case["expect"] == "ids":
            got = [[int(t) for t in line.split()] for line in run.stdout.splitlines()]
            if got != case["ids"]:
                problem = f"ids differ from the Python engine's:\n  got      {got}\n  expected {case['ids']}"
        else:  # stream: "<prompt index> <token>" lines
            lines = [line.split() for line in run.stdout.splitlines()]
            got = [int(t) for i, t in lines if i == "0"]
            if got != case["ids"] or any(i != "0" for i, _ in lines):
                problem = f"streamed ids differ:\n  got      {run.stdout!r}\n  expected {case['ids']}"
        if problem:
            failed += 1
            print(f"FAIL {case['name']}: {problem}\n  command: {' '.join([binary, *args])}")
            print(f"  exit {run.returncode}, stderr: {run.stderr.strip()[:800]}")
        else:
            print(f"ok   {case['name']}")
    print(f"{failed} of {len(cases)} cases failed ({binary})")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "write":
        write(Path(argv[1]))
        return 0
    if len(argv) in (3, 4) and argv[0] == "check" and argv[3:] in ([], ["--quick"]):
        return check(Path(argv[1]), argv[2], quick=argv[3:] == ["--quick"])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
