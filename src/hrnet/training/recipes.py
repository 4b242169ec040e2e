"""The training recipes that ship inside the package (``hrnet/recipes/*.yaml``).

``hrnet train finetune`` works after a plain install from any directory: a bare name (no ``/``, no
``.yaml`` suffix) is a packaged recipe; anything else is a path, as before. ``hrnet recipes`` lists
them and ``hrnet recipes NAME`` prints one to copy and edit. Each recipe's first comment line is its
one-line description.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HRNetError

#: The folder holding the recipes (package data, see pyproject.toml).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SUFFIXES = (".yaml", ".yml")


class RecipeError(HRNetError):
    """A recipe name that is not one of the packaged recipes."""


def recipe_names() -> list[str]:
    """The packaged recipes' names, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def is_recipe_name(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a recipe rather than a file: no folder part and no YAML suffix."""
    text = os.fspath(text)
    return bool(text) and "/" not in text and os.sep not in text and not text.endswith(SUFFIXES)


def recipe_path(name: str) -> Path:
    """The file of the packaged recipe ``name``; a :class:`RecipeError` listing the recipes otherwise."""
    if name in recipe_names():
        return RECIPES_DIR / f"{name}.yaml"
    raise RecipeError(f"{name[:80]}: no such recipe; the recipes are {', '.join(recipe_names())} (hrnet recipes), "
                      f"and a YAML file is given by its path (./{name[:80]}.yaml)")


def resolve_recipe(config: str | os.PathLike) -> Path:
    """A recipe name as its packaged file; a path (or a name-like file that exists here) as itself."""
    name = os.fspath(config)
    if is_recipe_name(name) and (name in recipe_names() or not Path(name).is_file()):
        return recipe_path(name)
    return Path(config)


def recipe_description(name: str) -> str:
    """The recipe's first comment line, without the ``#``."""
    for line in recipe_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(":")
    return ""


def recipe_text(name: str) -> str:
    """The recipe's YAML text, comments included (what ``hrnet recipes NAME > my.yaml`` writes)."""
    return recipe_path(name).read_text(encoding="utf-8")
