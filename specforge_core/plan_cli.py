"""``specforge plan CONFIG``: the plan of a config and the problems ``config validate`` reports.

Its own module because it joins the two: ``plan`` (arithmetic) and ``checks`` (which uses it).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", help="config files and section.field=value overrides")


def main(args: argparse.Namespace) -> int:
    from specforge_core.checks import check_config
    from specforge_core.config import load_config
    from specforge_core.plan import build_plan, format_plan

    files = [i for i in args.config if "=" not in i]
    overrides = [i for i in args.config if "=" in i]
    config = load_config(files, overrides)
    problems = check_config(config, inputs=False)  # sizing: the data may live on the cluster only
    print(format_plan(config, build_plan(config), problems), end="")
    return 2 if any(p.level == "error" for p in problems) else 0
