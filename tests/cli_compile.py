"""Compile a model through the CLI with a recipe written to a TOML file (shared by CLI tests)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from trimrt.cli import main


def compile_with_recipe(model: Path, recipe_text: str, folder: Path) -> Result:
    """`trimrt compile MODEL -o folder/build --recipe folder/recipe.toml`; asserts it succeeded."""
    (folder / "recipe.toml").write_text(recipe_text)
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(folder / "build"),
                                       "--recipe", str(folder / "recipe.toml")])
    assert result.exit_code == 0, result.output
    return result
