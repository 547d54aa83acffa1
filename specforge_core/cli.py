"""The ``specforge`` command line.

Arguments after a subcommand are config files and ``section.field=value`` overrides, in any order
(an argument containing ``=`` is an override). Heavy modules load only inside the subcommand.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import attrs

from specforge_core import __version__
from specforge_core.files import carried_error

log = logging.getLogger("specforge")


def split_config_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return files, overrides


def _load(args: argparse.Namespace):
    from specforge_core.config import load_config

    files, overrides = split_config_args(args.config)
    for name in files:
        _refuse_override_without_value(name)
    return load_config(files, overrides)


_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_][\w-]*)+$")


def _refuse_override_without_value(arg: str) -> None:
    """``training.lr`` (no ``=``) is an override missing its value, not a config file: say so rather
    than "config file not found"."""
    from specforge_core.config import ConfigError
    from specforge_core.config.schema import SpecforgeConfig

    if Path(arg).exists() or not _KEY.match(arg) or arg.endswith(".toml"):
        return
    sections = {f.name for f in attrs.fields(SpecforgeConfig)}
    if arg.split(".", 1)[0] in sections:
        raise ConfigError(f"{arg!r} is an override without a value (write {arg}=VALUE); "
                          "arguments without '=' are config files")


# ----------------------------------------------------------------------------------- commands
def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from specforge_core.hookspecs import KINDS
    from specforge_core.registry import RegistryError, get_registry

    reg = get_registry()
    defaults = {}
    for kind in KINDS:
        try:
            defaults[kind] = reg.default_name(kind)
        except RegistryError:  # none or two declared: only a config leaving the selector empty fails
            pass
    table = Table(title="specforge plugins", caption="(default): what an empty selector means (register_defaults)")
    for col in ("plugin", "distribution", "version", "kind", "component", "description"):
        table.add_column(col)
    order = list(reg._components)
    for plugin in reg.plugins:
        comps = sorted((c for c in reg.components() if c.plugin.name == plugin.name),
                       key=lambda c: order.index(c.kind))
        if not comps:
            table.add_row(plugin.name, plugin.distribution, plugin.version, "-", "-", "")
        for i, c in enumerate(comps):  # one row per component: its one-line description beside it
            first = i == 0
            table.add_row(
                plugin.name if first else "", plugin.distribution if first else "",
                plugin.version if first else "", c.kind,
                c.name + (" (default)" if defaults.get(c.kind) == c.name else ""), c.description,
            )
    for plugin, why in reg.broken:
        table.add_row(plugin.name, plugin.distribution, plugin.version, "BROKEN", "", why)
    Console(width=int(os.environ.get("COLUMNS", "120"))).print(table)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from specforge_core.config import dump_toml

    sys.stdout.write(dump_toml(_load(args)))
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    files, _ = split_config_args(args.config)
    try:  # semantic checks across sections and against the target's config.json
        from specforge_core.checks import check_config
    except ImportError:
        problems = []
    else:
        problems = check_config(cfg, inputs=not args.skip_inputs)
    errors = [p for p in problems if getattr(p, "level", "error") == "error"]
    for p in problems:
        print(f"{getattr(p, 'level', 'error')}: {p}", file=sys.stderr)
    if errors:
        return 2
    print(f"ok: {', '.join(files) or 'defaults'} (run {cfg.run.name!r}, pipeline {cfg.run.pipeline!r})")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from specforge_core.config.reference import render_reference
    from specforge_core.registry import get_registry

    text = render_reference(get_registry())
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `specforge config reference --output {args.output}`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from specforge_core.pipeline import run_pipeline
    from specforge_core.training.checkpoint import latest_checkpoint

    cfg = _load(args)
    try:
        run_pipeline(cfg)
    except KeyboardInterrupt:
        last = latest_checkpoint(cfg.output_dir)
        where = f"the newest complete checkpoint is {last}" if last else "no complete checkpoint was written"
        print(f"interrupted: {where}; continue with `specforge run {' '.join(args.config)} training.resume=true`",
              file=sys.stderr)
        return 130
    return 0


def cmd_data_regenerate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from specforge_core.data.regenerate import output_path, regenerate

    cfg = _load(args)
    summary = regenerate(cfg, console=Console(stderr=True) if cfg.logging.progress else None,
                         restart=args.restart)
    print(f"wrote {output_path(cfg)}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def cmd_data_features(args: argparse.Namespace) -> int:
    from rich.console import Console

    from specforge_core.data.features import write_features

    cfg = _load(args)
    s = write_features(cfg, console=Console(stderr=True))
    print(f"wrote {s.cache_dir}: {s.shards} shards, {s.samples} samples, {s.tokens:,} tokens, "
          f"{s.bytes / 2**20:.1f} MiB ({s.bytes_per_token:.0f} B/token); {s.written_shards} shards written now")
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from specforge_core.vocab import build_vocab_for_config

    path = build_vocab_for_config(_load(args), args.output)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from specforge_core.export import export_from_checkpoint

    out = export_from_checkpoint(_load(args), checkpoint_dir=args.checkpoint, out_dir=args.output)
    print(f"wrote {out}")
    return 0


def _delegate(module: str) -> tuple[Callable, Callable]:
    """Subcommands owned by their own module: ``add_arguments(parser)`` and ``main(args)``."""
    import importlib

    mod = importlib.import_module(module)
    return mod.add_arguments, mod.main


# Subcommands that live in their own modules (loaded only to build their parser).
DELEGATED = {
    "eval": ("specforge_core.evaluation.cli", "measure a draft's acceptance length offline"),
    "plan": ("specforge_core.plan_cli", "print placement, bytes and memory of a config without running"),
    "reference": ("specforge_core.reference", "get the reference target, data and MT-bench prompts (SmolLM2)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specforge", description="Train EAGLE-3 draft models.")
    parser.add_argument("--version", action="version", version=f"specforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", nargs="*", help="config files and section.field=value overrides")
        return p

    with_config(sub.add_parser("run", help="run the pipeline a config describes")).set_defaults(func=cmd_run)
    sub.add_parser("plugins", help="list installed plugins and their components").set_defaults(func=cmd_plugins)

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    with_config(cfg.add_parser("show", help="print the fully resolved config as TOML")).set_defaults(func=cmd_config_show)
    validate = with_config(cfg.add_parser("validate", help="check a config without running anything"))
    validate.add_argument("--skip-inputs", action="store_true",
                          help="do not check that the data files, target and output_dir exist here "
                               "(a recipe for another machine)")
    validate.set_defaults(func=cmd_config_validate)
    ref = cfg.add_parser("reference", help="generate the config reference from core and plugin classes")
    ref.add_argument("--output", default="docs/config-reference.md", help="file to write ('-' = stdout)")
    ref.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    ref.set_defaults(func=cmd_config_reference)

    vocab = with_config(sub.add_parser("vocab", help="build the draft vocab mapping from the dataset"))
    vocab.add_argument("--output", default=None, help="where to write (default: <output_dir>/vocab_mapping.safetensors)")
    vocab.set_defaults(func=cmd_vocab)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    regen = with_config(data.add_parser(
        "regenerate", help="the target rewrites every assistant turn of dataset.path ([regenerate] settings)",
    ))
    regen.add_argument("--restart", action="store_true", help="an output file written with other inputs or "
                       "settings is moved aside and a new one started (default: refused)")
    regen.set_defaults(func=cmd_data_regenerate)
    with_config(data.add_parser(
        "features", help="run the target once and write its features to the transfer store's cache",
    )).set_defaults(func=cmd_data_features)

    export = with_config(sub.add_parser("export", help="export a checkpoint for SGLang / vLLM"))
    export.add_argument("--checkpoint", default=None, help="checkpoint dir (default: newest in output_dir)")
    export.add_argument("--output", default=None, help="export dir (default: <output_dir>/export)")
    export.set_defaults(func=cmd_export)

    for name, (module, help_text) in DELEGATED.items():
        p = sub.add_parser(name, help=help_text)
        try:
            add_arguments, main_fn = _delegate(module)
        except ImportError:  # module not present in this build
            p.set_defaults(func=lambda a, n=name: _missing(n))
            continue
        add_arguments(p)
        p.set_defaults(func=main_fn)
    return parser


def _missing(name: str) -> int:
    print(f"specforge {name}: not available in this build", file=sys.stderr)
    return 2


# Errors about the user's input that are not config errors: a bad data record (under on_error =
# "stop"), an output_dir another run holds or that holds another run's checkpoints, a resume whose
# config changed, a checkpoint refused or unreadable. Exit 2 like a config error (docs/guarantees.md).
# Looked up only in modules already imported: importing them here would pull torch into every command.
_INPUT_ERRORS = (
    ("specforge_core.data.formats", "DataError"),
    ("specforge_core.rundir", "RunDirError"),
    ("specforge_core.training.checkpoint", "CheckpointError"),
)


def _input_errors() -> tuple[type, ...]:
    found = (getattr(sys.modules.get(mod), name, None) for mod, name in _INPUT_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from specforge_core.config import ConfigError
    from specforge_core.registry import RegistryError

    args = build_parser().parse_args(argv)
    before = list(logging.getLogger().handlers)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        if handler not in before:
            handler.addFilter(_printed_below)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - incl. torch's CheckpointException, a BaseException
        if args.debug:
            raise
        line, code = _describe_error(carried_error(exc), (ConfigError, RegistryError))
        print(line, file=sys.stderr)
        return code


def _printed_below(record: logging.LogRecord) -> bool:
    """False for a record a library's own handler printed already: huggingface_hub gives its logger a
    stream handler and lets records propagate too, so each retry warning came out twice."""
    logger: Optional[logging.Logger] = logging.getLogger(record.name)
    while logger is not None and logger is not logging.getLogger():
        if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _describe_error(exc: BaseException, config_errors: tuple[type, ...]) -> tuple[str, int]:
    """One stderr line and the exit code for an error that ends a command (docs/guarantees.md)."""
    if isinstance(exc, config_errors) or isinstance(exc, _input_errors()):
        # the user's input: the message names the key/file and what to do
        return f"error: {exc}", 2
    if isinstance(exc, OSError):  # a file, a full disk, a permission: name the path and the cause
        what = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC and not what.startswith("no space left on the device"):
            what = "no space left on the device"  # the OS's words vary; a checkpoint save says more
        where = f" {exc.filename}:" if exc.filename else ""  # no filename: the message names it
        return f"error:{where} {_first_line(what)} (--debug shows the traceback)", 1
    message = _first_line(str(exc))
    return f"error: {type(exc).__name__}{': ' + message if message else ''} (--debug shows the traceback)", 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
