"""hrnet recipes: list the packaged training recipes, or print one to edit."""

from __future__ import annotations

import argparse
import sys

from ._common import add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "recipes", "list the training recipes that ship with hrnet, or print one to edit",
                   "  hrnet recipes                      # name and one line each\n"
                   "  hrnet recipes finetune > my.yaml   # a copy to edit, then: hrnet train my.yaml --data photos/\n"
                   "  hrnet recipes --json\n\n"
                   "hrnet train NAME runs a recipe by name from any directory; hrnet train PATH runs a file.")
    p.add_argument("name", nargs="?", metavar="NAME", help="print this recipe's YAML (comments included)")
    add_output_args(p)
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..training.recipes import recipe_description, recipe_names, recipe_path, recipe_text

    if args.name:
        text = recipe_text(args.name)
        if args.json:
            print_json({"name": args.name, "path": str(recipe_path(args.name)), "yaml": text})
        else:
            sys.stdout.write(text)
        return 0
    rows = [{"name": n, "description": recipe_description(n), "path": str(recipe_path(n))} for n in recipe_names()]
    if args.json:
        print_json(rows)
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            print(f"{r['name']:<{width}}  {r['description']}")
    return 0
