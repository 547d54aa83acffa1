"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s docs`.

nox's default (virtualenv) backend is used on purpose: pip there honours the machine's local torch
wheel, so `torch==2.13.0` installs from disk instead of pulling a multi-GB CUDA build.
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # any torch in pyproject's range works; this one is a CPU build on our machines
EXAMPLE_PLUGIN = "examples/plugins/specforge-step-decay"


@nox.session
def tests(session: nox.Session) -> None:
    """The full test suite (CPU; real Ray, real Mooncake over TCP, real gloo groups)."""
    session.install(TORCH)
    session.install("-e", ".[dev,mooncake-cpu]")
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
