"""The layout stays layered: no module imports from a higher floor or another module's private names."""

from __future__ import annotations

import importlib
import pkgutil

from tests.helpers import layers


def test_no_module_imports_upwards_or_a_private_name(tmp_path):
    found = layers.violations()
    assert found == [], "\n".join(str(v) for v in found)


def test_the_checker_catches_both_kinds(tmp_path):
    """The check itself can fail: a tree with an upward import and a private import is reported."""
    for floor in ("core", "bot"):
        (tmp_path / floor).mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "core" / "errors.py").write_text("from bot.app import build_application\n")
    (tmp_path / "bot" / "app.py").write_text("def f():\n    from core.errors import _hidden\n")
    found = {(v.path, v.what) for v in layers.violations(tmp_path, ["core", "bot"])}
    assert found == {("core/errors.py", "core/ imports upwards from bot.app"),
                     ("bot/app.py", "imports private _hidden from core.errors")}


def test_every_floor_is_a_package_whose_modules_import(tmp_path):
    """Every module of every floor imports on its own (no circle, no name left behind by the move)."""
    for floor in layers.FLOORS:
        package = importlib.import_module(floor)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{floor}."):
            importlib.import_module(info.name)
